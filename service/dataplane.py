"""The data plane: admission, execution and readiness of model calls, with no HTTP in sight.

Two execution modes run the same `ModelAPI` hooks (`setup`, `predict`/`predict_steps`, `encode_response`):

- `inline`: every HTTP server process loads the model and batches the requests it holds itself, running each batch
  on its event loop in steps short enough that the loop keeps answering in between. On a CPU a hand-off to
  another process costs more than a small model's call (a pickled request and answer, two pipe writes and three
  thread hops), and the HTTP processes are already one per core.
- `worker`: LitServe's inference workers own the model (and the GPU); requests reach them through LitServe's
  queues and dynamic batching.

State shared by all processes (readiness, items in flight, measured cost per item) lives in `SharedState`, made
before any process is started, so that admission and readiness are decided for the whole server, not per process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from service import metrics
from service.errors import ApiError
from service.litserve_adapter import WorkerFailure

logger = logging.getLogger("nnserve")

Mode = Literal["inline", "worker"]
T = TypeVar("T")

# The measured cost per item follows the load with this weight per batch: about the last 20 batches count.
EWMA_WEIGHT = 0.05


class ModelState:
    """One model's state shared by every process of the server.

    `slots` are the processes that execute the model: the HTTP servers in inline mode, the inference workers in
    worker mode. Each slot is written by its own process only (and cleared by the supervisor when that process
    dies), so no lock is needed.
    """

    def __init__(self, slots: int, http_servers: int) -> None:
        ctx = mp.get_context("spawn")
        self.slots = slots
        self.ready = ctx.Array("b", slots, lock=False)
        self.in_flight = ctx.Array("q", http_servers, lock=False)  # items admitted by each HTTP server
        self.seconds_per_item = ctx.Value("d", 0.0, lock=False)
        self.failed = ctx.Value("b", 0, lock=False)

    def is_ready(self) -> bool:
        return not self.failed.value and all(self.ready)

    def any_ready(self) -> bool:
        return not self.failed.value and any(self.ready)

    def total_in_flight(self) -> int:
        return sum(self.in_flight)

    def observe(self, items: int, seconds: float) -> None:
        """Fold one model call's cost per item into the moving average."""
        cost = seconds / max(items, 1)
        old = self.seconds_per_item.value
        self.seconds_per_item.value = cost if old == 0.0 else old + EWMA_WEIGHT * (cost - old)


class ErrorChannel:
    """Where a process that fails to start says why, for the supervisor to say last.

    A one-way pipe: it needs no lock (so no resource-tracker process) and no feeder thread, and a message under
    PIPE_BUF bytes is written in one piece even when several processes fail at once.
    """

    MAX_CHARS = 1000

    def __init__(self) -> None:
        self.reader, self.writer = mp.get_context("spawn").Pipe(duplex=False)

    def put(self, line: str) -> None:
        self.writer.send_bytes(line[: self.MAX_CHARS].encode())

    def drain(self) -> list[str]:
        lines = []
        while self.reader.poll():
            lines.append(self.reader.recv_bytes().decode(errors="replace"))
        return lines


class SharedState:
    def __init__(self, names: list[str], slots: int, http_servers: int) -> None:
        ctx = mp.get_context("spawn")
        self.models = {name: ModelState(slots, http_servers) for name in names}
        self.draining = ctx.Value("b", 0, lock=False)
        self.errors = ErrorChannel()


@dataclass(frozen=True)
class AdmissionPolicy:
    """Refuse work only when it could not be answered in time.

    A request is refused (503 + Retry-After) when the expected wait for its items exceeds `max_queue_delay`: the
    items already in flight in the whole server, times the measured seconds per item, shared by the `executors`
    that run the model in parallel. `max_in_flight` is a memory bound on top.
    """

    max_in_flight: int
    max_queue_delay: float
    executors: int

    def expected_wait(self, state: ModelState, items: int) -> float:
        return (state.total_in_flight() + items) * state.seconds_per_item.value / self.executors

    def refusal(self, state: ModelState, items: int) -> str | None:
        """Why `items` more cannot be admitted now, or None when they can."""
        in_flight = state.total_in_flight()
        if in_flight and in_flight + items > self.max_in_flight:
            return f"{in_flight} items in flight (limit {self.max_in_flight})"
        wait = self.expected_wait(state, items)
        if in_flight and wait > self.max_queue_delay:
            return f"expected wait {wait:.1f} s exceeds {self.max_queue_delay:g} s"
        return None


def overloaded(model: str, reason: str, retry_after: float) -> ApiError:
    headers = {"Retry-After": str(max(1, round(retry_after)))}
    return ApiError(503, "overloaded", f"{model} is overloaded: {reason}; retry shortly", headers)


# The longest the inline executor runs a model without letting its event loop answer others. A batch runs in
# model calls of as many rows as fit in this at the measured cost per item (CIFAR-10: 7 rows of 2 ms, digits the
# full 32), with a turn of the loop between calls: the loop keeps reading, refusing and answering while a batch of
# 64-image requests runs (130 ms of CIFAR-10 each), and no thread is involved. Against batches of over 5 ms
# handed to a thread of their own (with large bodies decoded in the pool), five interleaved 8 s runs each on two
# cores, medians: CIFAR-10 64 per JSON request at c=32 872 against 768 images/s, MNIST 64 per multipart request
# 4,082 against 3,952, single CIFAR-10 images at c=64 706 against 697 req/s.
LOOP_SLICE_S = 0.015


# Between two model calls the loop turns until a turn finds next to nothing to do, at most this many times. One
# turn moves each request being read, parsed or answered by a single step, and a request takes several steps from
# its first bytes to the queue: with one turn between calls, requests waited calls for their turns (p99 at c=256,
# two 8 s runs each: single CIFAR-10 images 1,355-1,480 ms with one turn, 460-482 ms with this; digits 246-373
# and 183-192 ms; with batches on a thread of their own 512-516 and 212-273 ms).
MAX_TURNS = 16
IDLE_TURN_S = 0.0002


async def run_ready() -> None:
    """Let the event loop run what is ready: turn it until a turn takes under `IDLE_TURN_S`, at most `MAX_TURNS`."""
    for _ in range(MAX_TURNS):
        start = time.perf_counter()
        await asyncio.sleep(0)
        if time.perf_counter() - start < IDLE_TURN_S:
            return


async def finish_on_loop(steps: Generator[None, None, T]) -> T:
    """Drive a model's steps (`service.api.Steps`) to the end, letting the loop run what is ready between them:
    the event loop's counterpart of `service.api.finish`."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await run_ready()


def rows_per_call(seconds_per_item: float, limit: int) -> int:
    """Rows of one model call that fit in `LOOP_SLICE_S` (all `limit` before anything is measured)."""
    if seconds_per_item <= 0.0:
        return limit
    return max(1, min(limit, int(LOOP_SLICE_S / seconds_per_item)))


class InlineExecutor:
    """Runs one model in this process, on its event loop: requests queue here and run in batches, each batch in
    steps of about `LOOP_SLICE_S` with a turn of the loop between them.

    The batch forms while the previous one runs: the next takes everything queued (up to `max_batch_size`
    requests), so under load batches grow by themselves and no request waits for a timer. It stops taking requests
    once it holds the rows of one full model call (`max_rows`): more would not make a call bigger, and every
    request of a batch is answered when the last is done. 32 CIFAR-10 requests of 64 images sent at once were one
    batch of about 4 s, every answer as late as the last: 3.62 s on average, against 1.98 s taken one by one (the
    last at 4.4 s either way; 2-core VM, three bursts each).
    """

    def __init__(self, api: Any, state: ModelState, slot: int) -> None:
        self.api = api
        self.state = state
        self.slot = slot
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def load(self, device: str) -> None:
        """Load and warm up the model (blocking), then count this process as ready."""
        self.api.setup(device)
        self.state.ready[self.slot] = 1

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.api.name}")

    async def stop(self) -> None:
        self.state.ready[self.slot] = 0
        if self.task is not None:
            self.task.cancel()

    def is_ready(self) -> bool:
        return bool(self.state.ready[self.slot]) and self.task is not None

    async def submit(self, payload: Any) -> Any:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((payload, future))
        return await future

    async def _run(self) -> None:
        limit = self.api.max_batch_size
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0)  # requests read in this turn of the loop join the batch
            held, full = self.api.items(batch[0][0]), self.api.max_rows()
            while len(batch) < limit and held < full and not self.queue.empty():
                batch.append(self.queue.get_nowait())
                held += self.api.items(batch[-1][0])
            batch = [(p, f) for p, f in batch if not f.done()]  # drop requests that timed out while queued
            if not batch:
                continue
            rows = rows_per_call(self.state.seconds_per_item.value, self.api.max_rows())
            try:
                outputs = await finish_on_loop(self.api.predict_steps([p for p, _ in batch], rows))
                answers = [self.api.encode_response(y) for y in outputs]
            except Exception as e:  # the hooks isolate failures per request; this is a bug in them
                logger.exception("batch of %s failed", self.api.name)
                answers = [e] * len(batch)
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


class WorkerExecutor:
    """Hands requests to LitServe's inference workers and waits for their answers."""

    # How often a waiting request checks whether the model's workers are gone.
    FAILURE_POLL_S = 0.25

    def __init__(self, api: Any, state: ModelState, exchange: Callable[..., Any]) -> None:
        self.api = api
        self.state = state
        self.exchange = exchange

    def is_ready(self) -> bool:
        return self.state.any_ready()

    async def submit(self, payload: Any) -> Any:
        return await self.exchange(self.api, payload, self.FAILURE_POLL_S, lambda: self.state.failed.value)


def public_manifest(manifest: Any) -> dict[str, Any]:
    """What any caller may see of a manifest: no library versions and no paths of the machine it was trained on."""
    doc = manifest.model_dump(mode="json")
    doc.pop("libraries", None)
    training = doc.get("training") or {}
    (training.get("config") or {}).pop("data_dir", None)
    return doc


class DataPlane:
    """What an HTTP server process knows of the models: readiness, admission, and where to run a request."""

    def __init__(self, apis: list[Any], settings: Any, state: SharedState, mode: Mode, device: str) -> None:
        self.apis = {api.name: api for api in apis}
        self.settings = settings
        self.state = state
        self.mode = mode
        self.device = device
        self.slot = 0
        executors = settings.api_servers if mode == "inline" else settings.workers_per_device
        self.policy = AdmissionPolicy(settings.max_in_flight, settings.queue_delay_limit(), executors)
        self.executors: dict[str, InlineExecutor | WorkerExecutor] = {}

    # --- life in one HTTP server process ---------------------------------------------------------------
    async def start(self, slot: int, exchange: Callable[..., Any]) -> None:
        """Make this process able to serve: load the models (inline) or connect to the workers."""
        self.slot = slot
        if self.mode == "worker":
            self.executors = {n: WorkerExecutor(a, self.state.models[n], exchange) for n, a in self.apis.items()}
            return
        inline = {n: InlineExecutor(a, self.state.models[n], slot) for n, a in self.apis.items()}
        try:
            await asyncio.gather(*(asyncio.to_thread(e.load, self.device) for e in inline.values()))
        except Exception as e:
            self.state.errors.put(f"HTTP server {slot} could not load its models: {e}")
            raise
        for executor in inline.values():
            executor.start()
        self.executors = dict(inline)

    async def stop(self) -> None:
        for executor in self.executors.values():
            if isinstance(executor, InlineExecutor):
                await executor.stop()

    # --- readiness --------------------------------------------------------------------------------------
    def draining(self) -> bool:
        return bool(self.state.draining.value)

    def model_ready(self, name: str) -> bool:
        """The whole server can answer this model: every process that runs it is warm."""
        return not self.draining() and self.state.models[name].is_ready()

    def known(self, name: str) -> str:
        if name not in self.apis:
            raise self.not_found(name)
        return name

    def not_found(self, name: str) -> ApiError:
        return ApiError(404, "not_found", f"no model {name!r}; serving: {', '.join(self.apis)}")

    def check_ready(self, name: str) -> None:
        """This process can run `name` now; else 503 at once (a held request would only time out).

        Shutting down is no reason to refuse: a request that reached this process before its socket closed is
        in flight, and is answered.
        """
        executor = self.executors.get(name)
        if executor is None or not executor.is_ready():
            raise ApiError(503, "not_ready", f"model {name} is not ready; retry shortly", {"Retry-After": "1"})

    # --- admission and execution ------------------------------------------------------------------------
    def check_capacity(self, name: str, items: int) -> None:
        state = self.state.models[name]
        reason = self.policy.refusal(state, items)
        if reason is not None:
            metrics.OVERLOADED.labels(name).inc()
            raise overloaded(name, reason, self.policy.expected_wait(state, items))

    async def infer(self, name: str, payload: dict[str, Any]) -> Any:
        """Admit the payload's items within the server-wide bounds, run them, and release them."""
        items = self.apis[name].items(payload)
        self.check_capacity(name, items)
        counts = self.state.models[name].in_flight
        counts[self.slot] += items
        metrics.IN_FLIGHT.labels(name).inc(items)
        try:
            return await self.executors[name].submit(payload)
        except WorkerFailure as e:
            if e.timed_out:
                raise ApiError(504, "timeout", str(e)) from None
            if self.state.models[name].failed.value:
                message = f"the {name} worker stopped; retry shortly"
                raise ApiError(503, "worker_failed", message, {"Retry-After": "5"}) from None
            raise ApiError(500, "internal", f"the {name} worker failed on this request") from None
        finally:
            counts[self.slot] -= items
            metrics.IN_FLIGHT.labels(name).dec(items)

    def model_info(self, name: str) -> dict[str, Any]:
        api = self.apis[name]
        return {
            "name": name,
            "version": api.manifest.version,
            "task": api.manifest.task,
            "backend": api.backend,
            "device": self.device,
            "execution": self.mode,
            "providers": api.planned_providers(),
            "ready": self.model_ready(name),
            "manifest": public_manifest(api.manifest),
        }
