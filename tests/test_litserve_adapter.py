"""The contract with LitServe's internals (service/litserve_adapter.py), and the batching loop with no HTTP.

Every private name the adapter relies on is checked here for presence and shape, so a LitServe upgrade that
changes one fails with the symbol's name instead of a hang at run time.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import pickle
import re
import threading
import time
from pathlib import Path
from queue import Queue
from typing import Any, ClassVar

import litserve as ls
import numpy as np
import pytest
from fastapi import HTTPException

ROOT = Path(__file__).resolve().parents[1]


def _parameters(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


def _require(condition: bool, symbol: str, what: str) -> None:
    assert condition, f"LitServe changed {symbol}: {what} (update service/litserve_adapter.py)"


def test_private_symbols_exist_with_the_shapes_the_adapter_needs() -> None:
    from litserve.loops import base
    from litserve.loops.simple_loops import BatchedLoop
    from litserve.transport.process_transport import MPQueueTransport
    from litserve.utils import LitAPIStatus, ResponseBufferItem

    server = ls.LitServer
    _require(hasattr(server, "_init_manager"), "LitServer._init_manager", "missing")
    _require(_parameters(server._init_manager) == ["self", "num_api_servers"], "LitServer._init_manager", "signature")
    _require(
        _parameters(server.launch_inference_worker) == ["self", "lit_api"], "LitServer.launch_inference_worker", "args"
    )
    _require(
        _parameters(server._inference_workers_config_for_api) == ["self", "api_path"],
        "LitServer._inference_workers_config_for_api",
        "signature",
    )
    _require(
        _parameters(server._register_api_endpoints) == ["self", "lit_api", "request_type", "response_type"],
        "LitServer._register_api_endpoints",
        "signature",
    )
    _require(_parameters(server._register_internal_endpoints) == ["self"], "LitServer._register_internal_endpoints", "")
    _require(_parameters(server._register_middleware) == ["self"], "LitServer._register_middleware", "signature")
    _require(_parameters(server.lifespan) == ["self", "app"], "LitServer.lifespan", "signature")
    _require(_parameters(MPQueueTransport.__init__) == ["self", "manager", "queues"], "MPQueueTransport", "signature")
    _require(
        _parameters(MPQueueTransport.areceive) == ["self", "consumer_id", "timeout", "block"],
        "MPQueueTransport.areceive",
        "signature",
    )
    transport = MPQueueTransport(None, [Queue()])
    _require(isinstance(getattr(transport, "_queues", None), list), "MPQueueTransport._queues", "missing")
    _require(getattr(transport, "_closed", None) is False, "MPQueueTransport._closed", "missing")
    reader = inspect.getsource(ls.server.response_queue_to_buffer)
    _require("transport.areceive(consumer_id)" in reader, "litserve.server.response_queue_to_buffer", "its read")
    _require(base._SENTINEL_VALUE == (None, None, None, None), "litserve.loops.base._SENTINEL_VALUE", "value")
    _require(issubclass(base._StopLoopError, Exception), "litserve.loops.base._StopLoopError", "not an exception")
    _require(
        _parameters(BatchedLoop.get_batch_requests) == ["self", "lit_api", "request_queue", "transport"],
        "BatchedLoop.get_batch_requests",
        "signature",
    )
    call = _parameters(BatchedLoop.__call__)
    _require(call[:4] == ["self", "lit_api", "device", "worker_id"], "BatchedLoop.__call__", f"arguments {call}")
    _require(hasattr(LitAPIStatus, "ERROR") and hasattr(LitAPIStatus, "OK"), "litserve.utils.LitAPIStatus", "members")
    item = ResponseBufferItem(asyncio.Event())
    _require(hasattr(item, "response") and hasattr(item, "event"), "litserve.utils.ResponseBufferItem", "fields")


def test_the_constructor_still_calls_the_route_hooks_and_sets_the_attributes() -> None:
    """A real LitServer built by the adapter: the hooks run, GZip is gone, the queue attributes exist."""
    from service.litserve_adapter import AdaptedServer

    calls: list[str] = []

    class Probe(AdaptedServer):
        def register_routes(self) -> None:
            calls.append("routes")

        def register_predict_route(self, lit_api: ls.LitAPI) -> None:
            calls.append(lit_api.api_path)

    class Echo(ls.LitAPI):
        def setup(self, device: str) -> None: ...

        def predict(self, x: Any) -> Any:
            return x

    server = Probe(Echo(api_path="/echo"), accelerator="cpu", devices=1)
    assert calls == ["routes", "/echo"]
    assert not any("GZip" in repr(m) for m in server.app.user_middleware), "LitServe's GZip middleware was added"
    server.init_queues(2)
    assert set(server.litapi_request_queues) == {"/echo"}
    assert server.workers_per_api(server.lit_api) == 1
    assert hasattr(server, "_transport") and hasattr(server, "response_buffer")


def test_only_the_adapter_imports_litserve_internals() -> None:
    offenders = []
    for path in (ROOT / "service").rglob("*.py"):
        if path.name == "litserve_adapter.py":
            continue
        if re.search(r"^\s*(from|import) litserve\.", path.read_text(), re.MULTILINE):
            offenders.append(path.name)
    assert offenders == [], f"only service/litserve_adapter.py may import litserve.<module>: {offenders}"


# --- the batching loop, in process, with plain queues -------------------------------------------------------
class _Api:
    def __init__(self, max_batch_size: int, batch_timeout: float = 0.0, request_timeout: float = 30.0) -> None:
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.request_timeout = request_timeout


def _item(uid: str, age: float = 0.0) -> tuple[int, str, float, dict[str, str]]:
    import time

    return (0, uid, time.monotonic() - age, {"uid": uid})


def test_loop_takes_everything_queued_up_to_the_batch_size() -> None:
    from service.litserve_adapter import DrainingLoop

    queue: Queue = Queue()
    for i in range(5):
        queue.put(_item(str(i)))
    batch, timed_out = DrainingLoop().get_batch_requests(_Api(max_batch_size=3), queue, None)
    assert [uid for _, uid, _ in batch] == ["0", "1", "2"] and timed_out == []
    batch, _ = DrainingLoop().get_batch_requests(_Api(max_batch_size=3), queue, None)
    assert [uid for _, uid, _ in batch] == ["3", "4"]


def test_loop_waits_for_more_only_within_the_timeout() -> None:
    from service.litserve_adapter import DrainingLoop

    queue: Queue = Queue()
    queue.put(_item("a"))
    threading.Timer(0.05, queue.put, args=(_item("b"),)).start()
    batch, _ = DrainingLoop().get_batch_requests(_Api(max_batch_size=4, batch_timeout=0.5), queue, None)
    assert [uid for _, uid, _ in batch] == ["a", "b"]  # b arrived within the wait
    queue.put(_item("c"))
    batch, _ = DrainingLoop().get_batch_requests(_Api(max_batch_size=4, batch_timeout=0.0), queue, None)
    assert [uid for _, uid, _ in batch] == ["c"]


def test_loop_idles_without_spinning_and_stops_on_the_sentinel() -> None:
    from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError

    from service.litserve_adapter import IDLE_POLL_S, DrainingLoop

    queue: Queue = Queue()
    import time

    start = time.monotonic()
    assert DrainingLoop().get_batch_requests(_Api(4), queue, None) == ([], [])
    assert time.monotonic() - start >= IDLE_POLL_S * 0.9  # it blocked, it did not poll
    queue.put(_SENTINEL_VALUE)
    with pytest.raises(_StopLoopError):
        DrainingLoop().get_batch_requests(_Api(4), queue, None)


def test_loop_times_out_requests_that_waited_too_long() -> None:
    from service.litserve_adapter import DrainingLoop

    queue: Queue = Queue()
    queue.put(_item("old", age=10.0))
    queue.put(_item("new"))
    batch, timed_out = DrainingLoop().get_batch_requests(_Api(4, request_timeout=5.0), queue, None)
    assert [uid for _, uid, _ in batch] == ["new"] and timed_out == [(0, "old")]


def _echo_server() -> tuple[Any, ls.LitAPI]:
    """A real LitServer built by the adapter around one echoing API at /echo, with no routes of its own."""
    from service.litserve_adapter import AdaptedServer

    class Server(AdaptedServer):
        def register_routes(self) -> None: ...

        def register_predict_route(self, lit_api: ls.LitAPI) -> None: ...

    class Echo(ls.LitAPI):
        def setup(self, device: str) -> None: ...

        def predict(self, x: Any) -> Any:
            return x

    api = Echo(api_path="/echo")
    return Server(api, accelerator="cpu", devices=1), api


def test_exchange_reads_answers_errors_and_worker_failure() -> None:
    """The request/answer convention of the adapter, driven by hand as a worker would answer."""
    from litserve.utils import LitAPIStatus

    from service.litserve_adapter import WorkerFailure

    server, api = _echo_server()
    server.init_queues(1)
    server.set_api_server_id(server.app, 0)
    queue = server.litapi_request_queues["/echo"]

    async def answer_with(response: Any, status: Any) -> Any:
        task = asyncio.create_task(server.exchange(api, {"x": 1}, 0.05, lambda: False))
        response_queue_id, uid, _, payload = await asyncio.to_thread(queue.get, timeout=5)
        assert response_queue_id == 0 and payload == {"x": 1}
        server.response_buffer[uid].response = (response, status)
        server.response_buffer[uid].event.set()
        return await task

    async def scenario() -> None:
        assert await answer_with(b"ok", LitAPIStatus.OK) == b"ok"
        with pytest.raises(WorkerFailure) as failure:
            await answer_with(pickle.dumps(HTTPException(504, "late")), LitAPIStatus.ERROR)
        assert failure.value.timed_out
        with pytest.raises(WorkerFailure) as failure:
            await answer_with(pickle.dumps(ValueError("boom")), LitAPIStatus.ERROR)
        assert not failure.value.timed_out
        failed = False
        task = asyncio.create_task(server.exchange(api, {"x": 2}, 0.05, lambda: failed))
        await asyncio.sleep(0.1)
        failed = True
        with pytest.raises(WorkerFailure):
            await asyncio.wait_for(task, 1.0)  # the dead worker is noticed within a poll, not a timeout
        assert server.response_buffer == {}

    asyncio.run(scenario())


def test_answers_already_queued_are_read_in_one_thread_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP side's transport hands LitServe's own reader every answer already queued after one trip to a
    thread, in order; an empty read is None (as LitServe's transport answers), and a closed one stops the reader."""
    from service import litserve_adapter
    from service.litserve_adapter import DrainingTransport

    monkeypatch.setattr(litserve_adapter, "RESPONSE_POLL_S", 0.05)
    drains: list[int] = []
    real_drain = DrainingTransport._drain

    def counted(queue: Any, wait: float) -> list[Any]:
        items = real_drain(queue, wait)
        drains.append(len(items))
        return items

    monkeypatch.setattr(DrainingTransport, "_drain", staticmethod(counted))
    queue: Queue = Queue()
    transport = DrainingTransport(None, [queue])
    for i in range(5):
        transport.send(("uid", i), 0)

    async def scenario() -> None:
        assert [await transport.areceive(0) for _ in range(5)] == [("uid", i) for i in range(5)]
        assert drains == [5]
        assert await transport.areceive(0) is None
        transport.close(send_sentinel=False)
        with pytest.raises(asyncio.CancelledError):
            await transport.areceive(0)

    asyncio.run(scenario())
    assert transport.__reduce__()[0] is DrainingTransport  # a worker receives the same class


def test_litserve_reader_delivers_a_batch_of_answers_through_the_transport() -> None:
    """LitServe's `response_queue_to_buffer`, fed by the adapter's transport as a worker answers a batch: every
    waiting request gets its answer."""
    from litserve.server import response_queue_to_buffer
    from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

    server, _ = _echo_server()
    server.init_queues(1)

    async def scenario() -> None:
        uids = [f"u{i}" for i in range(40)]
        for uid in uids:
            server.response_buffer[uid] = ResponseBufferItem(asyncio.Event())
        reader = asyncio.create_task(
            response_queue_to_buffer(server._transport, server.response_buffer, 0, server.litapi_connector)
        )
        for i, uid in enumerate(uids):
            server._transport.send((uid, (i, LitAPIStatus.OK, LoopResponseType.REGULAR, 0)), 0)
        await asyncio.wait_for(asyncio.gather(*(server.response_buffer[u].event.wait() for u in uids)), 5)
        assert [server.response_buffer[u].response[0] for u in uids] == list(range(40))
        reader.cancel()

    asyncio.run(scenario())


def test_inline_executor_batches_what_queued_while_a_batch_ran() -> None:
    """The inline executor's batcher, in process: the event loop runs between a batch's model calls, and
    requests queued meanwhile form the next batch."""
    from service.dataplane import InlineExecutor, ModelState

    events: list[str] = []

    class SlowApi:
        name = "probe"
        max_batch_size = 8
        batches: ClassVar[list[int]] = []

        def setup(self, device: str) -> None: ...

        def max_rows(self) -> int:
            return 32

        @staticmethod
        def items(payload: dict[str, Any]) -> int:
            return 1

        def predict_steps(self, payloads: list[dict[str, Any]], rows: int) -> Any:
            import time

            self.batches.append(len(payloads))
            for _ in range(3):  # three model calls of 20 ms
                events.append("call")
                time.sleep(0.02)
                yield
            return [np.asarray(p["x"]) * 2 for p in payloads]

        def encode_response(self, y: Any) -> Any:
            return int(y)

    async def ticker() -> None:
        while True:
            events.append("tick")
            await asyncio.sleep(0)

    async def scenario() -> list[Any]:
        executor = InlineExecutor(SlowApi(), ModelState(slots=1, http_servers=1), slot=0)
        executor.load("cpu")
        executor.start()
        assert executor.is_ready()
        tick = asyncio.create_task(ticker())
        first = asyncio.create_task(executor.submit({"x": 0}))
        await asyncio.sleep(0.01)  # back while the first batch runs: the loop turned between its calls
        assert not first.done()
        rest = [asyncio.create_task(executor.submit({"x": i})) for i in range(1, 6)]
        answers = [await first, *[await r for r in rest]]
        tick.cancel()
        await executor.stop()
        return answers

    assert asyncio.run(scenario()) == [0, 2, 4, 6, 8, 10]
    assert SlowApi.batches == [1, 5]
    calls = [i for i, e in enumerate(events) if e == "call"]
    assert len(calls) == 6
    # another coroutine ran between every two model calls: none held the loop for a whole batch
    assert all("tick" in events[a:b] for a, b in itertools.pairwise(calls)), events


def test_inline_batches_stop_at_one_full_model_call_and_answer_as_they_finish() -> None:
    """A batch takes queued requests only until it holds `max_rows` rows: large requests go a few at a time, each
    answered when its own batch is done rather than when the last of 32 is; small ones still fill a call."""
    from service.dataplane import InlineExecutor, ModelState

    finished: list[int] = []

    class RowsApi:
        name = "probe"
        max_batch_size = 32
        batches: ClassVar[list[list[int]]] = []
        answered_before: ClassVar[list[int]] = []  # requests answered when each batch started

        def setup(self, device: str) -> None: ...

        def max_rows(self) -> int:
            return 32

        @staticmethod
        def items(payload: dict[str, Any]) -> int:
            return len(payload["x"])

        def predict_steps(self, payloads: list[dict[str, Any]], rows: int) -> Any:
            self.batches.append([len(p["x"]) for p in payloads])
            self.answered_before.append(len(finished))
            time.sleep(0.02)
            yield
            return [sum(p["x"]) for p in payloads]

        def encode_response(self, y: Any) -> Any:
            return y

    async def scenario() -> list[Any]:
        executor = InlineExecutor(RowsApi(), ModelState(slots=1, http_servers=1), slot=0)
        executor.load("cpu")
        executor.start()

        async def submit(i: int, rows: int) -> Any:
            answer = await executor.submit({"x": [i] * rows})
            finished.append(i)
            return answer

        first = asyncio.create_task(submit(0, 1))
        await asyncio.sleep(0.01)  # the first batch runs; the rest queue behind it
        large = [asyncio.create_task(submit(i, 20)) for i in range(1, 6)]
        await asyncio.sleep(0)
        small = [asyncio.create_task(submit(i, 1)) for i in range(6, 46)]
        answers = [await t for t in (first, *large, *small)]
        await executor.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [0, *(20 * i for i in range(1, 6)), *range(6, 46)]
    # 1 row alone; 20-row requests two at a time (40 >= 32 rows); the fifth with 12 single rows (32);
    # then 28 single rows, up to the queue's end
    assert RowsApi.batches == [[1], [20, 20], [20, 20], [20] + [1] * 12, [1] * 28]
    # each batch's requests were answered before the next batch ran, not all at the end
    assert RowsApi.answered_before == [0, 1, 3, 5, 18]
    assert finished[:5] == [0, 1, 2, 3, 4]


def test_between_model_calls_the_loop_runs_until_little_is_left() -> None:
    """A request takes several turns of the loop to reach the queue: between two model calls the loop turns until
    what was ready has run, and no more than MAX_TURNS times when new work keeps coming."""
    from service.dataplane import MAX_TURNS, run_ready

    async def request(steps: int, done: list[int]) -> None:
        for _ in range(steps):
            time.sleep(0.001)  # a step of reading or parsing
            await asyncio.sleep(0)
        done.append(steps)

    async def scenario() -> tuple[list[int], int]:
        done: list[int] = []
        tasks = [asyncio.create_task(request(steps, done)) for steps in (2, 5, 8)]
        await run_ready()
        finished = list(done)
        assert all(t.done() for t in tasks)
        endless = asyncio.create_task(request(10 * MAX_TURNS, done))
        await asyncio.sleep(0)
        await run_ready()  # returns while the endless request still has steps to go
        left = not endless.done()
        endless.cancel()
        return finished, left

    assert asyncio.run(scenario()) == ([2, 5, 8], True)


def test_rows_per_model_call_fit_the_loop_slice() -> None:
    from service.dataplane import LOOP_SLICE_S, rows_per_call

    assert rows_per_call(0.0, 32) == 32  # nothing measured yet
    assert rows_per_call(0.002, 32) == int(LOOP_SLICE_S / 0.002) < 32
    assert rows_per_call(0.0001, 32) == 32
    assert rows_per_call(10.0, 32) == 1
