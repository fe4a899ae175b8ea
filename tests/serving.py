"""Start a real nnserve server on 127.0.0.1 for a test and stop it afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.server import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(url: str, process: subprocess.Popen, log: Path, api_key: str = "", timeout: float = 120.0) -> None:
    headers = {"X-API-Key": api_key} if api_key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout} s:\n{log.read_text(errors='replace')}")


@contextmanager
def running_server(wait: bool = True, **env: str) -> Iterator[RunningServer]:
    """`python -m service` with NNSERVE_* overrides from `env`; waits for /ready unless `wait` is False."""
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"nnserve-test-{port}.log"
    full_env = {**os.environ, "NNSERVE_HOST": "127.0.0.1", "NNSERVE_PORT": str(port), "PYTHONUNBUFFERED": "1", **env}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = RunningServer(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        if wait:
            wait_ready(server.url, process, log, full_env.get("NNSERVE_API_KEY", ""))
        yield server
    finally:
        stop(process)
        log.unlink(missing_ok=True)


def stop(process: subprocess.Popen) -> None:
    """Interrupt the whole process group (HTTP servers and inference workers), then SIGKILL what remains."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=5)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: a server started by `running_server` leads its own group,
    and every process it starts stays in it even when its parent is gone, so this finds leftovers."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def process_name(pid: int) -> str:
    """The name a process gave itself (multiprocessing sets it for forked HTTP servers and workers)."""
    with suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def predict_multipart(url: str, name: str, pngs: list[bytes], chunk: int = 200) -> list[dict]:
    """Classify `pngs` over /v1 in multipart requests of `chunk` images; every answer must be 200."""
    out: list[dict] = []
    with httpx.Client(timeout=120) as client:
        for i in range(0, len(pngs), chunk):
            files = [("files", (f"{j}.png", b, "image/png")) for j, b in enumerate(pngs[i : i + chunk])]
            r = client.post(f"{url}/v1/{name}/predict", files=files)
            assert r.status_code == 200, r.text
            out.extend(r.json()["predictions"])
    return out


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of a Prometheus text exposition named exactly `name` (labels included); 0 if none."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
