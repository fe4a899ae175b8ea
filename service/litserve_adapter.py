"""nnserve's one seam to LitServe's internals: every private name of LitServe that nnserve relies on is used here.

LitServe (pinned at 0.2.19) gives nnserve its API hooks (`LitAPI.setup/predict/encode_response`), its FastAPI app
and middleware registration, its inference-worker processes and their batching loop. nnserve needs more control
than the public API offers in the places below; each names the private symbol, what nnserve needs from it, and why
the public API does not give it. `tests/test_litserve_adapter.py` pins every one of them, so a LitServe upgrade
that changes any fails there with the symbol's name, and the upgrade is a one-file job.

1. `LitServer._init_manager` and the attributes it sets (`litapi_request_queues`, `_shutdown_event`, `_transport`,
   `workers_setup_status`), with `litserve.transport.process_transport.MPQueueTransport(manager, queues)`, its
   `_queues` and `_closed`, and `areceive(consumer_id, timeout, block)` as LitServe's `response_queue_to_buffer`
   calls it (`None` when nothing came). LitServe routes every queue operation through a multiprocessing manager
   process: a blocking round trip through a third process per put and get (six per request, the manager alone
   used 25% of a core), and some 50 MB for the process. nnserve builds the same attributes over plain
   `multiprocessing` queues, and its transport hands over every answer already queued in one thread hop where
   LitServe's takes one hop per answer. Public API: only `fast_queue` (ZeroMQ), which 0.2.19 ignores
   (`TransportConfig(transport_config=...)` should be `transport_type`).
2. `LitServer.launch_inference_worker(lit_api) -> list[Process]`, `LitServer.devices` and
   `LitServer._inference_workers_config_for_api(api_path)`: start the workers of one API. `LitServer.run` does it
   inside a loop nnserve cannot supervise (its worker monitor neither restarts nor exits, see `serve` in
   `service/supervisor.py`).
3. The request queue item `(response_queue_id, uid, submitted_monotonic, payload)`, `LitServer.response_buffer`,
   `litserve.utils.ResponseBufferItem(event)` whose `.response` becomes `(payload, LitAPIStatus)`, and
   `FastAPI.response_queue_id`: how a request reaches a worker and its answer comes back. `BaseRequestHandler`
   reads the body as JSON or a form only, while nnserve also takes raw images and answers before queueing.
4. Worker failures come back as `(pickled exception, LitAPIStatus.ERROR)`; a queue timeout is an `HTTPException`
   with status 504.
5. `LitServer.middlewares` holding `(GZipMiddleware, {...})` before `_register_middleware` runs: LitServe always
   adds compression, which costs more server time than it saves on small JSON answers.
6. `LitServer._register_internal_endpoints()` and `_register_api_endpoints(lit_api, request_type, response_type)`:
   the hooks LitServe's constructor calls to add routes; nnserve replaces LitServe's `/`, `/health`, `/info` and
   predict routes with its own.
7. The batching loop: `litserve.loops.simple_loops.BatchedLoop.get_batch_requests(lit_api, request_queue,
   transport) -> (batch, timed_out)`, its `__call__(lit_api, device, worker_id, ...)`, and the stop signal
   `litserve.loops.base._SENTINEL_VALUE` / `_StopLoopError`. LitServe's loop polls every millisecond while idle (a
   busy spin at `batch_timeout=0`) and always waits the full timeout; the `loop=` hook is public, the pieces a loop
   is made of are not.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import pickle
import time
import uuid
from collections import deque
from multiprocessing.process import BaseProcess
from queue import Empty, Queue
from typing import Any

import litserve as ls
from fastapi import FastAPI, HTTPException
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.transport.process_transport import MPQueueTransport
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.middleware.gzip import GZipMiddleware

IDLE_POLL_S = 1.0  # how often an idle worker wakes to notice shutdown
RESPONSE_POLL_S = 1.0  # how often a reader of answers wakes to notice shutdown (LitServe's own reader: 1 s)


class WorkerFailure(Exception):
    """A worker answered with an error instead of a response."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("the request waited too long in the queue" if timed_out else "the model worker failed")
        self.timed_out = timed_out


class NoManager:
    """Stands where LitServe keeps its multiprocessing manager, which nnserve does not start."""

    def shutdown(self) -> None:
        pass


class DrainingTransport(MPQueueTransport):
    """LitServe's queue transport, except that a reader takes every answer already queued in one thread hop.

    LitServe reads answers with one `asyncio.to_thread(queue.get)` each, so a batch of N answers makes N trips
    through the default executor, each waiting its turn on a busy event loop (point 1 above)."""

    def __init__(self, manager: Any, queues: list[Any]) -> None:
        super().__init__(manager, queues)
        self._ready: dict[int, deque[Any]] = {}

    async def areceive(self, consumer_id: int, timeout: float | None = None, block: bool = True) -> Any:
        ready = self._ready.setdefault(consumer_id, deque())
        if not ready:
            if self._closed:
                raise asyncio.CancelledError("Transport closed")
            wait = RESPONSE_POLL_S if timeout is None else min(timeout, RESPONSE_POLL_S)
            ready.extend(await asyncio.to_thread(self._drain, self._queues[consumer_id], wait))
            if not ready:
                if self._closed:
                    raise asyncio.CancelledError("Transport closed")
                if timeout is not None:
                    raise Empty
                return None
        return ready.popleft()

    @staticmethod
    def _drain(queue: Any, wait: float) -> list[Any]:
        try:
            items = [queue.get(timeout=wait)]
        except Empty:
            return []
        while True:
            try:
                items.append(queue.get_nowait())
            except Empty:
                return items

    def __reduce__(self) -> tuple[Any, ...]:
        return (DrainingTransport, (None, self._queues))


class AdaptedServer(ls.LitServer):
    """`LitServer` with plain-pipe queues, no GZip, and route hooks left to the subclass."""

    def _init_manager(self, num_api_servers: int) -> NoManager:
        """Carry requests and responses over plain pipes, with no manager process (point 1 above)."""
        ctx = mp.get_context("spawn")
        self.workers_setup_status = {}
        self._shutdown_event = ctx.Event()
        for api in self.litapi_connector:
            self.litapi_request_queues[api.api_path] = ctx.Queue()
        self._transport = DrainingTransport(None, [ctx.Queue() for _ in range(num_api_servers)])
        return NoManager()

    def _register_middleware(self) -> None:
        self.middlewares = [m for m in self.middlewares if not (isinstance(m, tuple) and m[0] is GZipMiddleware)]
        super()._register_middleware()

    def _register_internal_endpoints(self) -> None:
        self.register_routes()

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any, response_type: Any) -> None:
        self.register_predict_route(lit_api)

    def register_routes(self) -> None:
        """Add the server's own routes to `self.app` (called once, from LitServer's constructor)."""
        raise NotImplementedError

    def register_predict_route(self, lit_api: ls.LitAPI) -> None:
        """Add the predict route of one API to `self.app` (called from LitServer's constructor)."""
        raise NotImplementedError

    # --- queues and workers -----------------------------------------------------------------------------
    def init_queues(self, num_api_servers: int) -> None:
        self._init_manager(num_api_servers)

    def start_workers(self, lit_api: ls.LitAPI) -> list[BaseProcess]:
        return self.launch_inference_worker(lit_api)

    def workers_per_api(self, lit_api: ls.LitAPI) -> int:
        return len(self._inference_workers_config_for_api(lit_api.api_path))

    def stop_workers(self, workers: dict[str, list[BaseProcess]], timeout: float) -> None:
        """Ask each live worker's loop to stop (one sentinel each), then end what is still running.

        A queue whose reader died can be full for good, and a process exits only after its queues' feeder threads
        have written everything: so no sentinel goes to a dead reader, and exit never waits on a queue.
        """
        for api in self.litapi_connector:
            queue = self.litapi_request_queues[api.api_path]
            queue.cancel_join_thread()
            for worker in workers.get(api.api_path, []):
                if worker.is_alive():
                    queue.put(_SENTINEL_VALUE)
        deadline = time.monotonic() + timeout
        for worker in (w for ws in workers.values() for w in ws):
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join(1)

    def set_api_server_id(self, app: FastAPI, server_id: int) -> None:
        """Which response queue this HTTP server process reads (set in the process before it serves)."""
        app.response_queue_id = server_id

    async def exchange(self, lit_api: ls.LitAPI, payload: Any, poll: float, failed: Any) -> Any:
        """Queue `payload` for `lit_api`'s workers and wait for the answer.

        Wakes every `poll` seconds to ask `failed()`: when it says the workers are gone, this raises
        `WorkerFailure` at once instead of waiting for an answer that will never come.
        """
        uid = uuid.uuid4().hex
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event)
        try:
            self.litapi_request_queues[lit_api.api_path].put(
                (self.app.response_queue_id, uid, time.monotonic(), payload)
            )
            while True:
                try:
                    await asyncio.wait_for(event.wait(), poll)
                    break
                except TimeoutError:
                    if failed():
                        raise WorkerFailure(timed_out=False) from None
            response, status = self.response_buffer[uid].response[:2]
        finally:
            self.response_buffer.pop(uid, None)
        if status == LitAPIStatus.ERROR:
            if isinstance(response, bytes):
                try:
                    response = pickle.loads(response)
                except Exception:
                    response = None
            raise WorkerFailure(timed_out=isinstance(response, HTTPException) and response.status_code == 504)
        return response


class DrainingLoop(BatchedLoop):
    """Dynamic batching that costs nothing when idle and adds no wait when a batch is already there.

    Blocks for the first request, takes every request already queued, and waits up to `batch_timeout` for more
    only while the batch is not full. Under load, requests pile up while the previous batch runs, so batches form
    without any added delay. Once the worker's `setup` succeeded, it calls `lit_api.worker_started(worker_id)`.
    """

    def __call__(self, lit_api: ls.LitAPI, device: str, worker_id: int, *args: Any, **kwargs: Any) -> None:
        lit_api.worker_started(worker_id)
        super().__call__(lit_api, device, worker_id, *args, **kwargs)

    def get_batch_requests(
        self, lit_api: ls.LitAPI, request_queue: Queue, transport: MessageTransport
    ) -> tuple[list[Any], list[Any]]:
        try:
            pending = [request_queue.get(timeout=IDLE_POLL_S)]
        except Empty:
            return [], []
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(pending) < lit_api.max_batch_size:
            try:
                pending.append(request_queue.get_nowait())
            except Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending.append(request_queue.get(timeout=remaining))
                except Empty:
                    break

        batch, timed_out = [], []
        now = time.monotonic()
        for item in pending:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, submitted, payload = item
            if lit_api.request_timeout not in (-1, False) and now - submitted > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                batch.append((response_queue_id, uid, payload))
        return batch, timed_out
