"""The one load generator: a closed loop of keep-alive HTTP/1.1 connections to 127.0.0.1.

On a 2-core machine the client shares the CPU with the server, so it must cost as little as possible:
requests are pre-built bytes, and a response is parsed only as far as its status line and body framing
(Content-Length or chunked). That is several times cheaper per request than a general HTTP client; its own
CPU use is measured and reported next to every result so a reader can see what it took from the server.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

HOST = "127.0.0.1"
RECONNECT_PAUSE_S = 0.05
CONNECT_STAGGER_S = 0.002
# After a 503 the connection waits this long before its next request, as a client that backs off would; far
# shorter than nnserve's Retry-After (1 s), so the offered load stays above what the server refuses at.
REFUSED_PAUSE_S = 0.1
REFUSED = 503
DRAIN_S = 5.0
T = TypeVar("T")


class _Broken(Exception):
    """The connection closed, timed out or sent something that is not an HTTP/1.1 response."""


class Connection(Protocol):
    """What the load loop needs of a connection, whatever protocol it speaks."""

    closed: bool
    sent_at: float  # when the request in flight was sent; 0 when none is
    timed_out: bool

    def request(self, data: bytes) -> asyncio.Future[int]:
        """Send one pre-built request; the future resolves to the answer's status, or fails with _Broken."""
        ...

    def fail(self, why: str) -> None:
        """Fail the request in flight and drop the connection."""
        ...


class _Http1Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.sent_at = 0.0
        self.closed = False
        self.timed_out = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.body_left = -1  # -1: status line and headers not read yet
        self.chunked = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fail("timed out" if self.timed_out else f"connection lost: {exc or 'closed by server'}")

    def fail(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(_Broken(why))
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def request(self, data: bytes) -> asyncio.Future[int]:
        """Send one request; the future resolves to the response's status once its body is read."""
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self.sent_at = time.perf_counter()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            done = self._parse()
        except ValueError as e:
            self.fail(f"malformed response: {e}")
            return
        if done and self.waiter is not None and not self.waiter.done():
            status, close = self.status, self.close_after
            self._reset()
            self.sent_at = 0.0
            if close:
                self.transport.close()  # type: ignore[union-attr]
                self.closed = True
            self.waiter.set_result(status)

    def _parse(self) -> bool:
        buf = self.buf
        if self.body_left < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if not head.startswith(b"http/1."):
                raise ValueError(head[:40].decode("latin-1"))
            self.status = int(head[9:12])
            self.close_after = b"\r\nconnection: close" in head
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                eol = head.find(b"\r\n", at + 2)
                self.body_left = int(head[at + 17 : eol if eol >= 0 else len(head)])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.chunked, self.body_left = True, 0
            elif self.status in (204, 304):
                self.body_left = 0
            else:
                raise ValueError("response without Content-Length or chunked framing")
        if self.chunked:
            return self._parse_chunks()
        if len(buf) < self.body_left:
            return False
        del buf[: self.body_left]
        return True

    def _parse_chunks(self) -> bool:
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return False
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            if size == 0:  # no trailers are sent by the servers under test
                if len(buf) < eol + 4:
                    return False
                del buf[: eol + 4]
                return True
            if len(buf) < eol + 2 + size + 2:
                return False
            del buf[: eol + 2 + size + 2]


async def _connect_http1(loop: asyncio.AbstractEventLoop, port: int) -> Connection:
    _, conn = await loop.create_connection(lambda: _Http1Connection(loop), HOST, port)
    return conn


# How each client kind opens a connection. Requests are pre-built bytes for every kind (see payloads.py), so
# another protocol is one more entry here, with its own Connection, and one more envelope there.
CLIENT_KINDS: dict[str, Callable[[asyncio.AbstractEventLoop, int], Awaitable[Connection]]] = {
    "http1": _connect_http1,
}


@dataclass
class LoadStats:
    """What one closed-loop run measured. Latencies, per answer status, cover the measuring window; status
    counts and failures (requests that got no HTTP answer: timeouts, broken connections) the whole run."""

    concurrency: int
    latencies_s: defaultdict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[int] = field(default_factory=Counter)
    slowest_s: dict[int, float] = field(default_factory=dict)  # per status, whole run
    failures: Counter[str] = field(default_factory=Counter)
    window_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    completed_total: int = 0  # every answered request, warm-up included: a live progress counter


class _Run:
    def __init__(
        self,
        port: int,
        requests: Sequence[bytes],
        stats: LoadStats,
        timeout_s: float,
        server_cpu: Callable[[], float] | None,
        client: str,
    ) -> None:
        self.port = port
        self.connect = CLIENT_KINDS[client]
        self.requests = requests
        self.stats = stats
        self.timeout_s = timeout_s
        self.server_cpu = server_cpu
        self.loop = asyncio.get_running_loop()
        self.conns: list[Connection] = []
        self.measuring = False
        self.stopping = False
        self.answers_left: int | None = None  # with max_requests: answers, good or not, still to measure
        self.finished = self.loop.create_future()
        self._t0 = self._cpu0 = self._srv0 = 0.0

    def start_window(self) -> None:
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        self._srv0 = self.server_cpu() if self.server_cpu else 0.0
        self.measuring = True

    def end_window(self) -> None:
        if not self.measuring:
            return
        self.measuring = False
        self.stopping = True
        self.stats.window_s = time.perf_counter() - self._t0
        self.stats.client_cpu_s = time.process_time() - self._cpu0
        self.stats.server_cpu_s = (self.server_cpu() - self._srv0) if self.server_cpu else 0.0
        if not self.finished.done():
            self.finished.set_result(None)

    async def _connect(self) -> Connection:
        conn = await self.connect(self.loop, self.port)
        self.conns.append(conn)
        return conn

    async def worker(self, index: int) -> None:
        stats, requests, n = self.stats, self.requests, len(self.requests)
        conn: Connection | None = None
        i = index
        # Connections opened in one burst all go to whichever server process wakes first (an accept loop takes
        # every pending one): a 2-process server then ran on one process. Clients arriving spread out, as real
        # ones do, let every process take its share.
        await asyncio.sleep(index * CONNECT_STAGGER_S)
        while not self.stopping:
            if conn is None or conn.closed:
                try:
                    conn = await self._connect()
                except OSError as e:
                    stats.failures[f"connect: {e.strerror or e}"] += 1
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                    continue
            t0 = time.perf_counter()
            try:
                status = await conn.request(requests[i % n])
            except _Broken as e:
                if not self.stopping:
                    stats.failures[str(e)] += 1
                conn = None
                continue
            latency = time.perf_counter() - t0
            i += 1
            stats.completed_total += 1
            stats.statuses[status] += 1
            stats.slowest_s[status] = max(stats.slowest_s.get(status, 0.0), latency)
            if self.measuring:
                stats.latencies_s[status].append(latency)
                if self.answers_left is not None:
                    self.answers_left -= 1
                    if self.answers_left <= 0:
                        self.end_window()
            if status == REFUSED:
                await asyncio.sleep(REFUSED_PAUSE_S)

    async def watchdog(self) -> None:
        """Abort connections whose request has waited past the timeout: one timer for all, not one per request."""
        while not self.stopping:
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            self.conns = [conn for conn in self.conns if not conn.closed]
            for conn in self.conns:
                if conn.sent_at and now - conn.sent_at > self.timeout_s:
                    conn.timed_out = True
                    conn.fail("timed out")


async def run_load(
    port: int,
    requests: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_requests: int | None = None,
    timeout_s: float = 30.0,
    server_cpu: Callable[[], float] | None = None,
    sample: Callable[[LoadStats], None] | None = None,
    sample_every_s: float = 0.5,
    client: str = "http1",
) -> LoadStats:
    """Keep `concurrency` requests in flight for `warmup_s`, then measure for `duration_s` or until
    `max_requests` are answered, whichever comes first, and stop. `sample` is called every `sample_every_s`."""
    if not requests:
        raise ValueError("no requests to send")
    # The generator's own full collections walked every object the bench process holds (its payloads, the results
    # so far): 37 ms each, a pause that landed in every system's latencies. Frozen, they walk only this run's.
    gc.freeze()
    try:
        stats = LoadStats(concurrency=concurrency)
        run = _Run(port, requests, stats, timeout_s, server_cpu, client)
        loop = run.loop
        loop.call_later(warmup_s, run.start_window)
        loop.call_later(warmup_s + duration_s, run.end_window)
        run.answers_left = max_requests
        workers = [loop.create_task(run.worker(i)) for i in range(concurrency)]

        async def sampler() -> None:
            while sample is not None:
                sample(stats)
                await asyncio.sleep(sample_every_s)

        background = [loop.create_task(run.watchdog()), loop.create_task(sampler())]
        await run.finished
        await asyncio.wait(workers, timeout=DRAIN_S)  # let in-flight requests finish before closing
        for conn in run.conns:
            if not conn.closed and conn.transport is not None:
                conn.transport.abort()
        for task in workers + background:
            task.cancel()
        outcomes = await asyncio.gather(*workers, *background, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):  # a fault of the generator itself, not of the server
                raise outcome
        return stats
    finally:
        gc.unfreeze()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on a fresh event loop, uvloop's when installed (less client CPU per request)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
