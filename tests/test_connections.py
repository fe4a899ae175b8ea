"""Connection limits at the protocol level, with raw sockets against real servers on 127.0.0.1.

Timeouts are lowered through NNSERVE_* so the tests take seconds; the bounds around them are generous (a fault must
be answered within a few seconds instead of never), except the lower ones, which show a deadline was waited for.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from bench.server import free_port
from service.http import Limits, missing_uvicorn_internals, protocol_class
from tests.serving import ROOT, RunningServer, running_server

HOST = "127.0.0.1"
KEY = "connection-tests-key"
HEAD_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
KEEP_ALIVE = 2.0
LIMIT = 20
SLACK = 10.0  # how late a deadline may be honoured on a loaded machine and still count as honoured
EARLY = 0.3  # timers may fire this much before the nominal deadline is measured here to have passed


@pytest.fixture(scope="module")
def quick() -> Iterator[int]:
    """Short deadlines; an API key, to show the answers come before authentication."""
    env = {
        "NNSERVE_MODELS": "digits",
        "NNSERVE_API_SERVERS": "1",
        "NNSERVE_API_KEY": KEY,
        "NNSERVE_HEADER_TIMEOUT": str(HEAD_TIMEOUT),
        "NNSERVE_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "NNSERVE_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE),
    }
    with running_server(**env) as server:
        yield port_of(server)


@pytest.fixture(scope="module")
def tight() -> Iterator[int]:
    """A low connection limit and long deadlines, so that held connections stay held for the whole test."""
    env = {
        "NNSERVE_MODELS": "digits",
        "NNSERVE_API_SERVERS": "1",  # one process: the limit applies to every connection the test opens
        "NNSERVE_API_KEY": KEY,
        "NNSERVE_MAX_CONNECTIONS": str(LIMIT),
        "NNSERVE_HEADER_TIMEOUT": "60",
        "NNSERVE_BODY_TIMEOUT": "60",
        "NNSERVE_KEEP_ALIVE_TIMEOUT": "60",
    }
    with running_server(**env) as server:
        yield port_of(server)


# --- raw HTTP/1.1 on sockets ------------------------------------------------------------------------------


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=30)


def request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str:
        assert self.headers.get("content-type") == "application/json", self.headers
        error = json.loads(self.body)["error"]
        assert isinstance(error["message"], str) and error["message"]
        return error["code"]


class Reader:
    """Responses read off one socket, keeping what arrived beyond the one asked for (pipelining)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed by the server; had {self.buffer[:200]!r}")
        self.buffer += data

    def response(self, timeout: float = 30.0, informational: bool = False) -> Response:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            self._fill(deadline)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        if status < 200 and not informational:
            return self.response(deadline - time.monotonic())
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill(deadline)
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(status, headers, body)


def read_response(sock: socket.socket, timeout: float = 30.0) -> Response:
    return Reader(sock).response(timeout)


def closed_after(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Seconds until the server closed `sock` (EOF or reset) and what it sent before; fails if it stays open."""
    start = time.monotonic()
    received = b""
    sock.settimeout(timeout)
    try:
        while data := sock.recv(65536):
            received += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {timeout} s; received {received[:200]!r}")
    return time.monotonic() - start, received


def parse(raw: bytes) -> Response:
    reader = Reader(socket.socket())  # never read from: `raw` already holds the whole response
    reader.buffer = raw
    return reader.response()


def is_closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` by now, without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


# --- deadlines ----------------------------------------------------------------------------------------------


def test_connection_that_sends_nothing_is_closed_silently_at_the_head_deadline(quick: int) -> None:
    with connect(quick) as sock:
        elapsed, received = closed_after(sock, HEAD_TIMEOUT + SLACK)
    assert received == b"", "nothing was asked, so nothing should be answered"
    assert elapsed >= HEAD_TIMEOUT - EARLY


def test_head_dribbled_byte_by_byte_gets_408_at_the_deadline(quick: int) -> None:
    head = request("GET", "/v1/models", {"X-Slow": "x" * 200})  # no key: the deadline comes before authentication
    with connect(quick) as sock:
        start = time.monotonic()
        answered = b""
        for byte in head[:-4]:  # never the blank line that ends the head
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                break
        else:
            pytest.fail("the dribbled head was never cut off")
        _, answered = closed_after(sock, SLACK)
    assert time.monotonic() - start >= HEAD_TIMEOUT - EARLY
    response = parse(answered)
    assert response.status == 408 and response.error_code() == "request_timeout"
    assert response.headers["connection"] == "close"


def test_body_that_keeps_arriving_is_read_and_one_that_stalls_gets_408(quick: int) -> None:
    head = request("POST", "/v1/digits/predict", {"X-API-Key": KEY, "Content-Type": "image/png"})
    head = head.replace(b"Content-Length: 0", b"Content-Length: 100000")
    with connect(quick) as sock:
        sock.sendall(head)
        # Bytes every 0.3 s for twice the stall bound: the body is slow but alive, so nothing may come back.
        dribble_until = time.monotonic() + 2 * BODY_TIMEOUT
        while time.monotonic() < dribble_until:
            sock.sendall(b"\x89")
            readable, _, _ = select.select([sock], [], [], 0.3)
            assert not readable, f"a body still arriving was cut off: {sock.recv(500)!r}"
        stalled_at = time.monotonic()
        _, answered = closed_after(sock, BODY_TIMEOUT + SLACK)
    assert time.monotonic() - stalled_at >= BODY_TIMEOUT - EARLY
    response = parse(answered)
    assert response.status == 408 and response.error_code() == "request_timeout"


def test_content_length_larger_than_the_body_gets_408_instead_of_hanging(quick: int) -> None:
    body = b"\x89PNG" + bytes(96)
    head = request("POST", "/v1/digits/predict", {"X-API-Key": KEY, "Content-Type": "image/png"}, body)
    with connect(quick) as sock:
        sock.sendall(head.replace(b"Content-Length: 100", b"Content-Length: 200"))
        start = time.monotonic()
        response = read_response(sock, BODY_TIMEOUT + SLACK)
        assert time.monotonic() - start >= BODY_TIMEOUT - EARLY
        assert response.status == 408 and response.error_code() == "request_timeout"
        closed_after(sock, SLACK)


# --- head size ----------------------------------------------------------------------------------------------


def test_64_kib_header_gets_431_before_authentication(quick: int) -> None:
    with connect(quick) as sock:
        sock.sendall(request("GET", "/v1/models", {"X-Filler": "a" * 65536}))  # and no API key
        response = read_response(sock)
        assert response.status == 431 and response.error_code() == "headers_too_large"
        closed_after(sock, SLACK)


def test_endless_header_is_refused_without_being_buffered(quick: int) -> None:
    """64 MiB of one header, sent as fast as possible: the server answers and closes after its first reads."""
    piece = b"a" * 65536
    sent = 0
    with connect(quick) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            for _ in range(1024):
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 64 * 2**20, "the server kept reading a 64 MiB header"
        response = read_response(sock)
    assert response.status == 431 and response.error_code() == "headers_too_large"


def test_head_under_the_limit_is_served(quick: int) -> None:
    with connect(quick) as sock:
        sock.sendall(request("GET", "/v1/models", {"X-API-Key": KEY, "X-Filler": "a" * 12000}))
        response = read_response(sock)
    assert response.status == 200, response.body


def metric(port: int, name: str) -> float:
    with connect(port) as sock:
        sock.sendall(request("GET", "/metrics", {"X-API-Key": KEY}))
        text = read_response(sock).body.decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


def test_cut_connections_and_open_ones_are_counted_in_metrics(quick: int) -> None:
    cut = 'nnserve_connections_cut_total{reason="headers_too_large"}'
    before = metric(quick, cut)
    with connect(quick) as sock:
        sock.sendall(request("GET", "/health", {"X-Filler": "a" * 20000}))
        assert read_response(sock).status == 431
    assert metric(quick, cut) == before + 1
    baseline = metric(quick, "nnserve_open_connections")
    with ExitStack() as stack:
        for _ in range(5):
            stack.enter_context(connect(quick))
        deadline = time.monotonic() + SLACK
        while metric(quick, "nnserve_open_connections") < baseline + 5:
            assert time.monotonic() < deadline, "the open connections gauge did not count 5 new connections"
            time.sleep(0.1)


# --- keep-alive ---------------------------------------------------------------------------------------------


def test_kept_alive_connection_is_reused_and_pipelined(quick: int) -> None:
    with connect(quick) as sock:
        reader = Reader(sock)
        for path in ("/health", "/v1/models", "/health"):
            sock.sendall(request("GET", path, {"X-API-Key": KEY}))
            response = reader.response()
            assert response.status == 200, response.body
            assert response.headers.get("connection") != "close"
        sock.sendall(request("GET", "/v1/models", {"X-API-Key": KEY}) + request("GET", "/health"))
        models, health = reader.response(), reader.response()
    assert models.status == 200 and "digits" in models.body.decode()
    assert health.status == 200 and json.loads(health.body) == {"status": "ok"}


def test_later_head_on_a_kept_alive_connection_is_timed_from_its_first_byte(quick: int) -> None:
    with connect(quick) as sock:
        sock.sendall(request("GET", "/health"))
        assert read_response(sock).status == 200
        time.sleep(KEEP_ALIVE / 2)
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        started = time.monotonic()
        response = read_response(sock, HEAD_TIMEOUT + SLACK)
        assert time.monotonic() - started >= HEAD_TIMEOUT - EARLY
        assert response.status == 408 and response.error_code() == "request_timeout"


def test_idle_kept_alive_connection_is_closed_at_the_keep_alive_timeout(quick: int) -> None:
    with connect(quick) as sock:
        sock.sendall(request("GET", "/health"))
        assert read_response(sock).status == 200
        elapsed, received = closed_after(sock, KEEP_ALIVE + SLACK)
    assert received == b""
    assert elapsed >= KEEP_ALIVE - EARLY


# --- connection limit ---------------------------------------------------------------------------------------


@contextmanager
def busy_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """`n` connections each in the middle of a request body, confirmed by the server's 100 Continue."""
    head = request("POST", "/v1/digits/predict", {"X-API-Key": KEY, "Content-Type": "image/png"})
    head = head.replace(b"Content-Length: 0", b"Content-Length: 100000\r\nExpect: 100-continue")
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            sock = stack.enter_context(connect(port))
            sock.sendall(head)
            assert Reader(sock).response(informational=True).status == 100
            sock.sendall(b"\x89PNG")
            socks.append(sock)
        yield socks


def test_connections_over_the_limit_get_503_but_health_is_served(tight: int) -> None:
    with busy_connections(tight, LIMIT) as held:
        for _ in range(5):
            with connect(tight) as sock:
                sock.sendall(request("GET", "/v1/models", {"X-API-Key": KEY}))
                response = read_response(sock)
                assert response.status == 503 and response.error_code() == "too_many_connections"
                assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
                closed_after(sock, SLACK)
        with connect(tight) as sock:
            sock.sendall(request("GET", "/health"))
            health = read_response(sock)
            assert health.status == 200 and json.loads(health.body) == {"status": "ok"}
            assert health.headers["connection"] == "close"  # served over the limit, then given back at once
        assert not any(is_closed(sock) for sock in held), "busy connections must not be closed to make room"
    # The held requests are gone; the slots come back.
    deadline = time.monotonic() + SLACK
    while True:
        with connect(tight) as sock:
            sock.sendall(request("GET", "/v1/models", {"X-API-Key": KEY}))
            if read_response(sock).status == 200:
                break
        assert time.monotonic() < deadline, "the limit did not free up after the held connections closed"
        time.sleep(0.2)


def test_past_twice_the_limit_newcomers_are_answered_503_unread(tight: int) -> None:
    with busy_connections(tight, LIMIT), ExitStack() as stack:
        for _ in range(LIMIT):  # over the limit and busy too: a head begun, never finished
            sock = stack.enter_context(connect(tight))
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(1.0)  # let the server read those partial heads, which makes them busy (it takes milliseconds)
        with connect(tight) as sock:
            _, answered = closed_after(sock, SLACK)  # sends nothing, is answered anyway
    response = parse(answered)
    assert response.status == 503 and response.error_code() == "too_many_connections"


def test_idle_connections_make_room_for_new_ones(tight: int) -> None:
    """300 idle connections against a limit of 20: the oldest idle ones are closed, new clients are served."""
    with ExitStack() as stack:
        kept_alive = []
        for _ in range(5):
            sock = stack.enter_context(connect(tight))
            sock.sendall(request("GET", "/health"))
            assert read_response(sock).status == 200
            kept_alive.append(sock)
        silent = [stack.enter_context(connect(tight)) for _ in range(300)]
        for path in ("/health", "/v1/models", "/ready"):
            with connect(tight) as sock:
                sock.sendall(request("GET", path, {"X-API-Key": KEY}))
                response = read_response(sock)
                assert response.status == 200, (path, response.body)
        deadline = time.monotonic() + SLACK
        while (closed := sum(is_closed(sock) for sock in kept_alive + silent)) < 305 - LIMIT:
            assert time.monotonic() < deadline, f"only {closed} of 305 idle connections were closed"
            time.sleep(0.2)
        assert all(is_closed(sock) for sock in kept_alive), "the oldest idle connections go first"
        assert not all(is_closed(sock) for sock in silent[-5:]), "the newest idle connections stay"


# --- uvicorn internals --------------------------------------------------------------------------------------


@contextmanager
def uvicorn_in_thread(limits: Limits) -> Iterator[uvicorn.Server]:
    """Plain uvicorn with the limited protocol, in this process, so its protocol objects can be inspected."""

    async def app(scope: dict, receive: object, send: object) -> None:
        while (await receive())["more_body"]:  # type: ignore[operator]
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    config = uvicorn.Config(
        app, host=HOST, port=free_port(), http=protocol_class(limits), ws="none", lifespan="off", log_level="warning"
    )
    with serving_in_thread(config) as server:
        yield server


@contextmanager
def serving_in_thread(config: uvicorn.Config) -> Iterator[uvicorn.Server]:
    """uvicorn serving `config` on a thread of this process, started, and stopped as a server stops."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive(), "uvicorn did not stop"


def test_uvicorn_internals() -> None:
    """What service/http.py relies on inside uvicorn is still there and still works as it did."""
    limits = Limits(header_timeout=30, body_timeout=30, max_header_bytes=1024, max_connections=10)
    with uvicorn_in_thread(limits) as server, connect(server.config.port) as sock:
        sock.sendall(request("POST", "/", body=b"12").replace(b"Content-Length: 2", b"Content-Length: 4"))
        deadline = time.monotonic() + 10
        while not (protocols := list(server.server_state.connections)) or protocols[0].cycle is None:
            assert time.monotonic() < deadline, "the request never reached the protocol"
            time.sleep(0.05)
        missing = missing_uvicorn_internals(protocols[0])  # checked in the middle of a request body
        assert not missing, f"uvicorn no longer has {missing}, which service/http.py relies on"
        sock.sendall(b"34")
        assert read_response(sock).status == 200
        with connect(server.config.port) as big:
            big.sendall(request("GET", "/", {"X-Filler": "a" * 2000}))  # one read: judged when the head ends
            status = read_response(big).status
        assert status == 431, (
            "HttpToolsProtocol.on_headers_complete no longer starts the request with HttpToolsProtocol.app, "
            "which service/http.py replaces to refuse a request"
        )


def test_body_deadline_shorter_than_the_head_deadline_is_kept() -> None:
    """The one timer of a connection is moved earlier when a body's stall bound ends before the head deadline."""
    limits = Limits(header_timeout=60, body_timeout=1, max_header_bytes=16384, max_connections=10)
    with uvicorn_in_thread(limits) as server, connect(server.config.port) as sock:
        sock.sendall(request("POST", "/", body=b"12").replace(b"Content-Length: 2", b"Content-Length: 4"))
        started = time.monotonic()
        response = read_response(sock, SLACK)
    assert response.status == 408 and response.error_code() == "request_timeout"
    assert 1 - EARLY <= time.monotonic() - started < SLACK


class _RecordedWrites:
    """A transport that keeps a copy of every write before passing it on."""

    def __init__(self, transport: object) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


def test_a_response_leaves_in_one_write_and_100_continue_at_once() -> None:
    """A server killed between a head and its body would leave a load balancer holding half a response it cannot
    retry: the head and the body go out in one write. An interim 100 Continue is not held back with it."""
    limits = Limits(header_timeout=30, body_timeout=30, max_header_bytes=16384, max_connections=10)
    with uvicorn_in_thread(limits) as server, connect(server.config.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # part of a head: the connection is open, no request yet
        deadline = time.monotonic() + 10
        while not (protocols := list(server.server_state.connections)):
            assert time.monotonic() < deadline, "the connection never reached the protocol"
            time.sleep(0.05)
        recorded = _RecordedWrites(protocols[0].transport)
        protocols[0].transport = recorded
        sock.sendall(b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            assert select.select([sock], [], [], 10)[0], f"no 100 Continue before the body: {interim!r}"
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"12")
        assert read_response(sock).status == 200
    assert recorded.writes[0] == interim
    assert len(recorded.writes) == 2, recorded.writes
    assert recorded.writes[1].startswith(b"HTTP/1.1 200 OK\r\n") and recorded.writes[1].endswith(b"\r\n\r\nok")


# --- memory -------------------------------------------------------------------------------------------------


def serve_here_and_report_garbage() -> None:
    """Body of the child of the test below: serve the repository in this process (one HTTP server, inline), send
    every kind of request twice over real HTTP, and print the second round's statuses and what it left for the
    cyclic garbage collector, by type."""
    import collections
    import gc

    from bench.payloads import SHAPES, build_requests
    from service.config import Settings
    from service.http import uvicorn_options
    from service.server import build_server
    from tests.data import cifar_test_pngs, mnist_test_pngs

    port = free_port()
    settings = Settings(device="cpu", host=HOST, port=port, api_servers=1)
    nnserver = build_server(settings)
    nnserver.set_api_server_id(nnserver.app, 0)
    config = uvicorn.Config(
        nnserver.asgi_app(), host=HOST, port=port, lifespan="on", log_level="warning", **uvicorn_options(settings)
    )
    digits = [png for png, _ in mnist_test_pngs(8)]
    cifar = [png for png, _ in cifar_test_pngs()[:8]]
    sent = [
        *build_requests("digits", SHAPES["x1"], digits[:1], [], port),
        *build_requests("digits", SHAPES["x8-multipart"], digits, [], port),
        *build_requests("cifar", SHAPES["x8-json"], cifar, [], port),
        *build_requests("cifar", SHAPES["v2-x1"], cifar[:1], [], port),
        *build_requests("sequence", SHAPES["series"], [], [[12.5] * 30], port),
        request("POST", "/v1/digits/predict", {"Content-Type": "image/png"}, b"not a png"),
        request("POST", "/v1/nope/predict", {"Content-Type": "image/png"}, digits[0]),
        request("GET", "/ready"),
        request("GET", "/metrics"),
    ]
    # Stopped as a server stops (its models unloaded), not torn down with the interpreter around a running thread.
    with serving_in_thread(config) as server:
        deadline = time.monotonic() + 120
        while not all(state.is_ready() for state in nnserver.state.models.values()):
            assert time.monotonic() < deadline, "the models did not get ready"
            time.sleep(0.05)
        statuses: list[int] = []
        for round_ in range(2):
            if round_ == 1:  # the first round made what is made once (imports, caches); count only the second's
                gc.collect()
                gc.disable()
                gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, not freed
            with connect(port) as sock:
                reader = Reader(sock)
                for raw in sent:
                    sock.sendall(raw)
                    statuses.append(reader.response().status)
            while server.server_state.connections:  # the server has closed its side too
                assert time.monotonic() < deadline, "the connection stayed open"
                time.sleep(0.05)
        gc.collect()
        garbage = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
        print(json.dumps({"statuses": statuses[len(sent) :], "garbage": garbage}), flush=True)
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_served_requests_are_freed_as_they_end_not_by_the_cyclic_collector(tmp_path: Path) -> None:
    """A request whose objects form a reference cycle stays in memory, with its scope and buffers, until a full
    collection finds it: when every request did, five seconds of digits at c=256 left each HTTP server 14 MB above
    its idle RSS instead of 7. Every kind of request, answered or refused, must be freed the moment it ends."""
    out = subprocess.run(
        [sys.executable, "-c", "from tests.test_connections import serve_here_and_report_garbage as f; f()"],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},  # read when prometheus_client is imported
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["statuses"] == [200, 200, 200, 200, 200, 400, 404, 200, 200], report
    assert report["garbage"] == {}, report["garbage"]
