"""Servers under test: start one on 127.0.0.1, wait until it is ready, watch its whole process
tree (RSS, CPU, whether torch got loaded), and stop it with every child it spawned.

Process facts come from /proc so the harness needs no psutil; LitServe servers are a tree of processes
(API server, inference workers, a multiprocessing manager), and all of them count.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from bench.loadgen import HOST

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE_S = 10.0
ORPHAN_SETTLE_S = 1.0  # children may take a moment to notice their parent is gone; not orphans yet


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out.extend(int(c) for c in task.read_text().split())
        except OSError:
            continue
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in seen or not Path(f"/proc/{pid}").exists():
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name; index i is field i + 3 of proc(5)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def _cpu_s(pid: int) -> float:
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0  # utime + stime


def _identity(pid: int) -> tuple[int, str]:
    """pid with its start time, so a pid reused by an unrelated process is never signalled."""
    fields = _stat_fields(pid)
    return pid, fields[19] if fields else ""


def _alive(pid: int, started: str) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[19] == started and fields[0] != "Z"


def _maps_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libtorch" in line for line in f)
    except OSError:
        return False


@dataclass
class Memory:
    rss_mb: float  # sum of VmRSS: counts pages shared between forked processes once per process
    pss_mb: float  # sum of proportional set size: shared pages split between their users
    processes: int


class Server:
    """A server under test, as a context manager: started and ready on enter, stopped with its tree on exit."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, log: Path, cwd: Path
    ) -> None:
        self.name, self.argv, self.env, self.port = name, argv, env, port
        self.ready_path, self.log, self.cwd = ready_path, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self.peak = Memory(0.0, 0.0, 0)
        self._cpu_seen: dict[int, float] = {}
        self.stop_s = 0.0
        self.orphans = 0  # processes left running when the main process had exited (or timed out)
        self.killed = 0  # processes still alive after the grace period
        self.torch_loaded = False

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 240.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            if self._ready():
                self.startup_s = time.perf_counter() - t0
                self.sample()
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.name} not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
        try:
            conn.request("GET", self.ready_path)
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc else []

    def sample(self) -> Memory:
        """Current memory of the whole tree; each field's peak is kept."""
        pids = self.pids()
        mem = Memory(
            rss_mb=sum(_status_kb(p, "VmRSS") for p in pids) / 1024,
            pss_mb=sum(_pss_kb(p) for p in pids) / 1024,
            processes=len(pids),
        )
        self.peak = Memory(*(max(a, b) for a, b in zip(astuple(self.peak), astuple(mem), strict=True)))
        return mem

    def check_torch(self) -> bool:
        """Whether any process of the tree has mapped libtorch so far (call after load: imports can be lazy)."""
        self.torch_loaded = self.torch_loaded or any(_maps_torch(p) for p in self.pids())
        return self.torch_loaded

    def cpu_seconds(self) -> float:
        """CPU time used by the tree so far; processes that exited keep their last reading."""
        for pid in self.pids():
            self._cpu_seen[pid] = _cpu_s(pid)
        return sum(self._cpu_seen.values())

    def summary(self) -> dict[str, object]:
        return {
            "startup_s": self.startup_s,
            "peak_rss_mb": self.peak.rss_mb,
            "peak_pss_mb": self.peak.pss_mb,
            "processes": self.peak.processes,
            "torch_loaded": self.torch_loaded,
            "stop_s": self.stop_s,
            "left_after_main_exit": self.orphans,
            "killed_after_grace": self.killed,
            "command": self.argv[1:],
        }

    def stop(self) -> None:
        """SIGTERM the main process, as `docker stop` does, and give the tree time to exit on its own. Children
        still running once the main process is gone (orphans: a plain LitServe app leaves its workers behind)
        get SIGTERM, then SIGKILL; only this tree is ever signalled. Notes how long it took and what was left."""
        if self.proc is None:
            return
        tree = [_identity(p) for p in self.pids()]
        t0 = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_GRACE_S)
        settle = time.perf_counter() + ORPHAN_SETTLE_S
        while time.perf_counter() < settle and any(_alive(*ident) for ident in tree):
            time.sleep(0.05)
        self.orphans = self._signal_left(tree, signal.SIGTERM)
        while time.perf_counter() - t0 < STOP_GRACE_S and any(_alive(*ident) for ident in tree):
            time.sleep(0.05)
        self.stop_s = time.perf_counter() - t0
        self.killed = self._signal_left(tree, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    @staticmethod
    def _signal_left(tree: list[tuple[int, str]], sig: signal.Signals) -> int:
        left = [pid for pid, started in tree if _alive(pid, started)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(left)
