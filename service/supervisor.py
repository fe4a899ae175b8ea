"""The main process: start the HTTP servers (and, in worker mode, LitServe's inference workers), watch them, and
shut down cleanly. The policy it enforces is written out in docs/operations.md:

- A process that dies before its models are ready ends the server: exit code 1 within seconds, with the reason as
  the last log line (a bad artifact or setting never fixes itself; a restart loop would only hide it).
- Inline mode: an HTTP server process that dies while serving is replaced by a new fork of this process; its
  model slots read not ready until the new one is warm. More than `MAX_RESTARTS` in `RESTART_WINDOW_S` seconds
  ends the server with exit code 1.
- Worker mode: an inference worker or HTTP server that dies while serving ends the server with exit code 1, after
  the requests the model's worker held were answered 503 at once. A replacement would read the same shared queues,
  which the dead process can leave torn or locked (one killed while reading holds the queue's lock for good), so
  the whole server is restarted by its supervisor instead (Docker's restart policy, Kubernetes).
- SIGTERM or SIGINT: stop accepting at once (the listening socket is closed and `/ready` says 503), let in-flight
  requests finish for up to `NNSERVE_SHUTDOWN_GRACE` seconds, then exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from service import process
from service.server import NNServer

logger = logging.getLogger("nnserve")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class Fatal(Exception):
    """The server cannot go on; the message says why."""


def _serve_http(server: NNServer, config: uvicorn.Config, sock: socket.socket, server_id: int) -> None:
    """Body of one forked HTTP server process."""
    # uvicorn handles SIGTERM/SIGINT itself while serving, then re-raises them with the handlers it found: these.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    process.name_process(f"nnserve-http-{server_id}")
    process.end_with_parent()
    server.set_api_server_id(server.app, server_id)
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    def __init__(self, server: NNServer, uvicorn_options: dict[str, Any]) -> None:
        self.server = server
        self.settings = server.settings
        self.options = uvicorn_options
        self.http: dict[int, BaseProcess] = {}
        self.workers: dict[str, list[BaseProcess]] = {}
        self.restarts: list[float] = []
        self.stop_requested = False
        self.wakeup_r, self.wakeup_w = os.pipe()

    # --- processes ---------------------------------------------------------------------------------------
    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            app=self.server.asgi_app(),
            log_level=self.settings.log_level,
            access_log=False,  # the gateway logs each request with its id
            lifespan="on",  # a failed start-up must end the process ("auto" would serve without the models)
            timeout_graceful_shutdown=max(1, round(self.settings.shutdown_grace)),
            **self.options,
        )

    def _fork_http(self, server_id: int) -> None:
        self.http[server_id] = process.fork(
            _serve_http, (self.server, self._config(), self.sock, server_id), f"nnserve-http-{server_id}"
        )

    def _ready_everywhere(self) -> bool:
        return all(state.is_ready() for state in self.server.state.models.values())

    def _reason(self, default: str) -> str:
        return "; ".join(self.server.state.errors.drain()) or default

    # --- the watch loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        s = self.settings
        self.sock = uvicorn.Config(app=None, host=s.host, port=s.port).bind_socket()
        self._install_signals()
        try:
            if self.server.mode == "worker":
                self.server.init_queues(s.api_servers)
                for api in self.server.litapi_connector:
                    self.workers[api.api_path] = self.server.start_workers(api)
            for server_id in range(s.api_servers):
                self._fork_http(server_id)
            self._watch()
        except Exception as e:  # a fault, or a bug of the supervisor's own: either way nothing may be left running
            if not isinstance(e, Fatal):
                logger.exception("supervisor failed")
            logger.error("stopping: %s", e)
            self._shutdown(grace=1.0)
            logger.error("nnserve stopped: %s", e)
            return 1
        self._shutdown(grace=s.shutdown_grace)
        logger.info("nnserve stopped")
        return 0

    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            self.stop_requested = True
            os.write(self.wakeup_w, b"x")

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _watch(self) -> None:
        was_ready = False
        while not self.stop_requested:
            processes = {p.sentinel: p for p in self.http.values()}
            processes |= {p.sentinel: p for ps in self.workers.values() for p in ps}
            wait([*processes, self.wakeup_r], timeout=0.5)
            if self.stop_requested:
                return
            if not was_ready and self._ready_everywhere():
                was_ready = True
                logger.info("all models ready")
            for api in self.server.litapi_connector:
                for worker_id, p in enumerate(self.workers.get(api.api_path, [])):
                    if not p.is_alive():
                        self._worker_died(api.name, worker_id, p)
            for server_id, p in list(self.http.items()):
                if not p.is_alive():
                    self._http_died(server_id, p)

    def _worker_died(self, model: str, worker_id: int, p: BaseProcess) -> None:
        state = self.server.state.models[model]
        started = state.ready[worker_id]
        state.failed.value = 1  # waiting requests are answered 503 within a poll
        state.ready[worker_id] = 0
        if not started:
            raise Fatal(self._reason(f"the {model} worker exited with code {p.exitcode} before it was ready"))
        time.sleep(2 * 0.25)  # two failure polls: the held requests get their 503 before the HTTP servers stop
        raise Fatal(f"the {model} worker {worker_id} died (exit code {p.exitcode}); restart the server")

    def _http_died(self, server_id: int, p: BaseProcess) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(p.pid)
        for state in self.server.state.models.values():
            state.in_flight[server_id] = 0  # its requests died with it
        if self.server.mode == "worker":  # the queues it shared with the workers may be torn
            raise Fatal(f"HTTP server {server_id} died (exit code {p.exitcode}); restart the server")
        # Inline mode: the HTTP servers are the model slots.
        started = all(state.ready[server_id] for state in self.server.state.models.values())
        for state in self.server.state.models.values():
            state.ready[server_id] = 0
        if not started:
            raise Fatal(self._reason(f"HTTP server {server_id} exited with code {p.exitcode} before it was ready"))
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            raise Fatal(f"HTTP servers died {len(self.restarts)} times in {RESTART_WINDOW_S:g} s")
        logger.warning("HTTP server %d died (exit code %s); starting a new one", server_id, p.exitcode)
        self._fork_http(server_id)

    # --- shutdown ----------------------------------------------------------------------------------------
    def _shutdown(self, grace: float) -> None:
        """Stop accepting, let the HTTP servers finish what they hold, then stop the workers."""
        self.server.state.draining.value = 1
        self.sock.close()  # with every HTTP server closing its copy too, new connections are refused at once
        for p in self.http.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 2
        for p in self.http.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        if self.workers:
            self.server.stop_workers(self.workers, timeout=5)
