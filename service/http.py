"""Connection limits enforced in the HTTP protocol, before a request reaches the application (and its API key check).

uvicorn bounds only the idle time between requests. Left alone, a connection may take forever to send its head or
its body, a head may be of any size (httptools has no limit), and connections are bounded only by file descriptors:
45,000 idle connections exhausted one HTTP server's descriptors and made half its /health probes fail. The protocol
here adds, per connection:

- a head deadline: the request line and headers must be complete `header_timeout` seconds after the connection
  opened (first request) or after the request's first byte (later ones). A connection that sent nothing is closed
  silently; one that sent part of a head gets 408.
- a body stall bound: a body that stops arriving for `body_timeout` seconds gets 408 (so does a Content-Length
  larger than the body actually sent). The clock stops while the server itself is not reading (flow control, or a
  100-continue the application has not asked for yet).
- a head size bound: more than `max_header_bytes` of request line and headers gets 431, checked as bytes arrive so
  that an endless header is refused after one read, not buffered.

and per HTTP server process a connection limit, `max_connections`. A connection arriving at the limit first makes
room by closing the connection that has been idle longest (one that has sent nothing yet, or a keep-alive one
between requests: closing it costs its client one reconnect). Only when every connection is busy is the newcomer
over the limit: it is read like any other, then answered 503 (JSON, Retry-After, connection closed), except
`/health`, which is served so that a liveness probe tells a busy process from a dead one. Over-limit connections
still cost a descriptor until their head arrives (at most `header_timeout`), so past twice the limit a newcomer is
answered 503 at once and closed without being read: descriptors per process stay below 2 x `max_connections`.

Metrics: `nnserve_open_connections`, and `nnserve_connections_cut_total` by reason (`head_timeout`, `body_timeout`,
`headers_too_large`, `over_limit`, `ceiling`, `made_room`).

A response's head and the first bytes of its body also leave in one write (`ResponseWrites`): a server killed
between two writes has sent a head without its body, which a load balancer has already passed on and cannot retry.

uvicorn internals relied on (pinned by tests/test_connections.py::test_uvicorn_internals, which names the missing
one if uvicorn changes): the `HttpToolsProtocol` constructor signature (config, server_state, app_state, _loop),
the methods it overrides (the asyncio protocol methods, the parser callbacks and `on_response_complete`, which the
request cycle calls when a response is out); its attributes `app` (read by `on_headers_complete` to start the
request), `cycle`, `flow`, `pipeline`, `loop`, `transport`, `server_state`; `RequestResponseCycle.response_started`,
`.response_complete`, `.keep_alive`, `.disconnected`, `.message_event`, `.waiting_for_100_continue`, `.transport`
(what the cycle writes its response to: the head when the response starts, then the body);
`FlowControl.read_paused`; `ServerState.default_headers`. All are listed in UVICORN_INTERNALS.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service import metrics

if TYPE_CHECKING:
    from service.config import Settings

logger = logging.getLogger("nnserve")

ASGIApp = Callable[[dict[str, Any], Callable, Callable], Awaitable[None]]

# The one path served over the connection limit: liveness must not depend on load (readiness may: /ready says 503).
HEALTH_PATH = "/health"

UVICORN_INTERNALS = (
    "HttpToolsProtocol.connection_made",
    "HttpToolsProtocol.connection_lost",
    "HttpToolsProtocol.data_received",
    "HttpToolsProtocol.on_message_begin",
    "HttpToolsProtocol.on_url",
    "HttpToolsProtocol.on_header",
    "HttpToolsProtocol.on_headers_complete",
    "HttpToolsProtocol.on_body",
    "HttpToolsProtocol.on_message_complete",
    "HttpToolsProtocol.on_response_complete",
    "HttpToolsProtocol.app",
    "HttpToolsProtocol.cycle",
    "HttpToolsProtocol.flow",
    "HttpToolsProtocol.pipeline",
    "HttpToolsProtocol.loop",
    "HttpToolsProtocol.transport",
    "HttpToolsProtocol.server_state",
    "RequestResponseCycle.response_started",
    "RequestResponseCycle.response_complete",
    "RequestResponseCycle.keep_alive",
    "RequestResponseCycle.disconnected",
    "RequestResponseCycle.message_event",
    "RequestResponseCycle.waiting_for_100_continue",
    "RequestResponseCycle.transport",
    "FlowControl.read_paused",
    "ServerState.default_headers",
)


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_connections: int


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for every HTTP server process's `uvicorn.Config` (see `service/supervisor.py`)."""
    limits = Limits(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_header_bytes=settings.max_header_bytes,
        max_connections=settings.max_connections,
    )
    return {
        "http": protocol_class(limits),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "ws": "none",  # no WebSocket routes: an upgrade request is an ordinary request
    }


def protocol_class(limits: Limits) -> type[LimitedHttpProtocol]:
    """uvicorn builds protocols from a class alone, so the limits travel as a class attribute."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


def missing_uvicorn_internals(protocol: LimitedHttpProtocol) -> list[str]:
    """The entries of UVICORN_INTERNALS that uvicorn no longer provides; `protocol` must be in the middle of a request.

    Methods are looked up on uvicorn's class (this module's overrides would hide a rename), attributes on the
    objects uvicorn made.
    """
    owners = {
        "RequestResponseCycle": getattr(protocol, "cycle", None),
        "FlowControl": getattr(protocol, "flow", None),
        "ServerState": getattr(protocol, "server_state", None),
    }
    missing = []
    for entry in UVICORN_INTERNALS:
        owner, attribute = entry.split(".")
        if owner == "HttpToolsProtocol":
            present = hasattr(HttpToolsProtocol, attribute) or attribute in vars(protocol)
        else:
            present = owners[owner] is not None and hasattr(owners[owner], attribute)
        if not present:
            missing.append(entry)
    return missing


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def error_app(status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> ASGIApp:
    """An ASGI app answering every request with one JSON error and closing the connection."""
    body = error_body(code, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *(extra or []),
    ]

    async def app(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


_RETRY_AFTER = [(b"retry-after", b"1")]
_TOO_MANY = ("too_many_connections", "this server process has too many connections; retry shortly")


def over_limit_app(app: ASGIApp) -> ASGIApp:
    """503 for everything but /health, which is served and then closes its connection."""
    refuse = error_app(503, *_TOO_MANY, _RETRY_AFTER)

    async def answer(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope.get("path") != HEALTH_PATH:
            cut("over_limit")
            await refuse(scope, receive, send)
            return

        async def send_and_close(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await app(scope, receive, send_and_close)

    return answer


def cut(reason: str) -> None:
    metrics.CONNECTIONS_CUT.labels(reason).inc()


class ConnectionTable:
    """The open connections of one HTTP server process; the idle ones in the order they became idle."""

    def __init__(self) -> None:
        self.open: set[LimitedHttpProtocol] = set()
        self.idle: OrderedDict[LimitedHttpProtocol, None] = OrderedDict()

    def set_idle(self, connection: LimitedHttpProtocol, idle: bool) -> None:
        if not idle:
            self.idle.pop(connection, None)
        elif connection in self.open and connection not in self.idle:
            self.idle[connection] = None

    def add(self, connection: LimitedHttpProtocol) -> None:
        self.open.add(connection)
        metrics.OPEN_CONNECTIONS.inc()

    def remove(self, connection: LimitedHttpProtocol) -> None:
        if connection in self.open:
            self.open.remove(connection)
            metrics.OPEN_CONNECTIONS.dec()
        self.idle.pop(connection, None)

    def close_oldest_idle(self) -> bool:
        if not self.idle:
            return False
        victim, _ = self.idle.popitem(last=False)
        self.remove(victim)
        victim.transport.close()
        cut("made_room")
        return True


# One table per uvicorn server (LitServe runs one per process; thread mode would run several in one process).
_TABLES: weakref.WeakKeyDictionary[ServerState, ConnectionTable] = weakref.WeakKeyDictionary()


class ResponseWrites:
    """What a request cycle writes its response to: the head waits for the body's first bytes, and both go to the
    socket in one write.

    uvicorn writes a head as the response starts and the body after it. A replica killed between the two had sent
    a head alone: behind HAProxy, a client of tests/test_docker.py's replica kill got `peer closed connection
    without sending complete message body`, as the load balancer had passed the head on and could no longer retry.
    With one write a killed server has sent all of a response or none of it, and none is retried elsewhere.
    A `100 Continue`, written before the response starts, passes at once.

    The cycle is held weakly: it holds this object as its transport, and a strong reference back made every request
    a reference cycle, with its scope, exit stacks and events, that only a full collection could free. Five seconds
    of digits at c=256 left each HTTP server 14 MB above its idle RSS, against 7 MB with the weak reference."""

    __slots__ = ("cycle", "head", "head_seen", "transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self.transport = transport
        self.cycle = weakref.ref(cycle)
        self.head = b""
        self.head_seen = False

    def write(self, data: bytes) -> None:
        cycle = self.cycle()
        if not self.head_seen and cycle is not None and cycle.response_started:
            self.head_seen, self.head = True, data
            return
        if self.head:
            data, self.head = self.head + data, b""
        self.transport.write(data)

    def close(self) -> None:
        if self.head:  # a response given up after its head: send what there is, as uvicorn would have
            self.transport.write(self.head)
            self.head = b""
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


_last_warning: dict[str, float] = {}


def _warn(kind: str, message: str, *args: object) -> None:
    """At most one line per kind every 10 s: under a flood of bad connections the log must not become the load."""
    now = time.monotonic()
    if now - _last_warning.get(kind, -10.0) >= 10.0:
        _last_warning[kind] = now
        logger.warning(message, *args)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body deadlines, a head size bound and a connection limit."""

    limits: ClassVar[Limits]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._table = _TABLES.setdefault(server_state, ConnectionTable())
        # One timer per connection, moved only when a deadline comes earlier than it: with the default settings a
        # request costs no timer operation at all (arming and cancelling one costs about 3 us, twice per request).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._head_deadline: float | None = None  # loop time the current head must be complete by
        self._in_body = False  # between the end of a head and the end of its body
        self._body_seen_at = 0.0  # loop time of the last body bytes
        self._in_message = False  # between the first byte of a request and the end of its body
        self._reading_head = True  # until the current head is complete
        self._head_bytes = 0  # raw bytes received while reading the current head (see data_received)
        self._head_size = 0  # request target and header lines of the current head, as parsed
        self._idle = False
        self._over_limit = False
        self._answered = False  # a protocol-level error went out; whatever else arrives is ignored

    # Connection life ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        table, limit = self._table, self.limits.max_connections
        if len(table.open) >= limit and not table.close_oldest_idle():
            if len(table.open) >= 2 * limit:
                _warn("ceiling", "%d connections open, none idle: refusing new ones unread", len(table.open))
                cut("ceiling")
                self._answer(503, *_TOO_MANY, _RETRY_AFTER)
                return
            _warn("limit", "connection limit %d reached, none idle: answering 503 to new connections", limit)
            self._over_limit = True
        table.add(self)
        self._update_idle()
        self._head_deadline = self.loop.time() + self.limits.header_timeout
        self._check_by(self._head_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._table.remove(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        # Bytes arriving while a head is being read belong to that head up to its end; if the head is still not
        # complete after them, all of them did. (A chunk arriving mid-body that also starts the next head is not
        # counted: the size check at the head's end still applies.)
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._reading_head and self._head_bytes > self.limits.max_header_bytes and not self._answered:
            cut("headers_too_large")
            self._answer(431, *self._head_too_large())
        self._update_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_idle()

    # Parser callbacks -----------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        self._head_size = 0
        if self._head_deadline is None:  # a later request on a kept-alive connection: its head is timed from now
            self._head_deadline = self.loop.time() + self.limits.header_timeout
            self._check_by(self._head_deadline)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._head_deadline = None
        self._reading_head = False
        self._head_bytes = 0
        if self._head_size > self.limits.max_header_bytes:
            cut("headers_too_large")
            self.app = error_app(431, *self._head_too_large())
        elif self._over_limit:
            self.app = over_limit_app(self.app)
        super().on_headers_complete()
        cycle = self.cycle
        # A new cycle writes to the socket itself (an upgrade starts none); a HEAD response is its head alone.
        if cycle is not None and cycle.transport is self.transport and cycle.scope["method"] != "HEAD":
            cycle.transport = ResponseWrites(self.transport, cycle)
        self._in_body = True
        self._body_seen_at = self.loop.time()
        self._check_by(self._body_seen_at + self.limits.body_timeout)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._body_seen_at = self.loop.time()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = False
        self._in_message = False
        self._reading_head = True

    # Deadlines ------------------------------------------------------------------------------------------------

    def _check_by(self, when: float) -> None:
        """Make sure the deadlines are checked no later than `when` (loop time)."""
        if self._timer is None or self._timer_at > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self._head_deadline is not None:
            self._check_head(now, self._head_deadline)
        elif self._in_body:
            self._check_body(now)
        # Otherwise the request is complete: uvicorn's keep-alive timeout rules until the next one begins.

    def _check_head(self, now: float, deadline: float) -> None:
        if self.flow.read_paused:  # the server stopped reading (pipelined requests waiting): not the client's fault
            self._head_deadline = deadline = now + self.limits.header_timeout
        if now < deadline:
            self._check_by(deadline)
            return
        cut("head_timeout")
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a response is still on its way: close after it, dropping the partial head
        elif self._in_message:
            timeout = self.limits.header_timeout
            self._answer(408, "request_timeout", f"request headers not complete within {timeout:g} s")
        else:
            self.transport.close()  # nothing was sent: nobody to answer

    def _check_body(self, now: float) -> None:
        timeout, cycle = self.limits.body_timeout, self.cycle
        if self.flow.read_paused or cycle.waiting_for_100_continue:
            self._body_seen_at = now  # the server is not reading yet: the stall clock restarts when it does
        if now - self._body_seen_at < timeout:
            self._check_by(self._body_seen_at + timeout)
            return
        cut("body_timeout")
        if cycle.response_complete:
            self.transport.close()  # answered early; the rest of the body never came
        elif cycle.response_started:
            cycle.keep_alive = False  # close once the response is out
        else:
            self._answer(408, "request_timeout", f"request body stalled: no bytes for {timeout:g} s")

    # Answers --------------------------------------------------------------------------------------------------

    def _head_too_large(self) -> tuple[str, str]:
        limit = self.limits.max_header_bytes
        return "headers_too_large", f"request line and headers exceed the limit of {limit} bytes"

    def _answer(self, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Write a JSON error straight to the socket and close it; a request being read sees a disconnect."""
        self._answered = True
        self._head_deadline = None
        self._in_body = False
        self._table.remove(self)
        body = error_body(code, message)
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(extra or []),
        ]
        head.extend(name + b": " + value + b"\r\n" for name, value in headers)
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True
            cycle.message_event.set()

    def _update_idle(self) -> None:
        """Idle: no request begun, none being answered. Only idle connections are closed to make room."""
        cycle = self.cycle
        idle = (
            not self._in_message
            and (cycle is None or cycle.response_complete)
            and not self.pipeline
            and not self.transport.is_closing()
        )
        if idle != self._idle:
            self._idle = idle
            self._table.set_idle(self, idle)
