"""Where a single-image request's CPU time goes, by stage, in nnserve and in the strong peer.

`python -m bench.profile` starts each server on 127.0.0.1, drives single-image requests at a fixed concurrency,
samples every process of the server with py-spy meanwhile, and reads the server tree's CPU time from /proc. Each
sample is put in the first stage (in the order of STAGES) whose marker appears in its stack, so a stage's share of
the samples times the measured CPU per request is that stage's CPU per request. py-spy samples running threads
only (`--idle` is off), so waiting does not count.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.loadgen import run, run_load
from bench.payloads import SHAPES, build_requests, cifar_pngs, default_data_dir, mnist_pngs
from bench.server import free_port, process_tree

# (stage, markers): a sample belongs to the stage of the innermost frame of its stack that names a marker.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("onnxruntime", "service/runtime.py")),
    ("decode and preprocess", ("PIL/", "preprocessing.py", "service/inputs.py", "bench/payloads.py")),
    ("answer (softmax, top-k, JSON)", ("json/", "_top_k", "encode_response", "predict_batch", "Response.__init__")),
    ("admission and hand-off", ("dataplane.py", "concurrent/futures", "threading.py")),
    ("gateway (id, key, metrics, log)", ("gateway.py", "prometheus_client", "service/logs.py", "uuid.py", "logging/")),
    ("routing and request objects", ("fastapi/", "starlette/", "service/routes.py", "pydantic", "peer_ort.py")),
    ("HTTP parse and write", ("uvicorn/", "httptools", "service/http.py")),
)
OTHER = "event loop and other"


def stage_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, markers in STAGES:
            if any(m in frame for m in markers):
                return name
    return OTHER


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / 100  # utime + stime in 1/100 s ticks
    return total


def _answers(port: int, model: str, png: bytes) -> bool:
    try:
        url = f"http://127.0.0.1:{port}/v1/{model}/predict"
        return httpx.post(url, content=png, headers={"Content-Type": "image/png"}).status_code == 200
    except httpx.TransportError:
        return False


def profile(
    system: str, model: str, concurrency: int, seconds: float, data_dir: Path, shape: str = "x1"
) -> dict[str, float]:
    port = free_port()
    if system == "nnserve":
        argv = [sys.executable, "-m", "service"]
    else:
        argv = [
            *(sys.executable, "-m", "uvicorn", "bench.apps.peer_ort:create_app", "--factory"),
            *("--workers", system.rsplit("-", 1)[1]),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"),
        ]
    env = {
        **os.environ,
        "NNSERVE_HOST": "127.0.0.1",
        "NNSERVE_PORT": str(port),
        "NNSERVE_MODELS": model,
        "NNSERVE_ACCESS_LOG": "false",
    }
    server = subprocess.Popen(
        argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    images = (mnist_pngs if model == "digits" else cifar_pngs)(data_dir, 256)
    requests = build_requests(model, SHAPES[shape], images, [], port)
    try:
        deadline = time.monotonic() + 120
        while not _answers(port, model, images[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [p for p in process_tree(server.pid) if p != server.pid]
        out = Path(tempfile.mkdtemp(prefix="nnserve-profile-"))
        spies = [
            subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "-p",
                    str(p),
                    "-d",
                    str(int(seconds)),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(out / f"{p}.txt"),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for p in workers
        ]
        before = tree_cpu_s(server.pid)
        stats = run(run_load(port, requests, concurrency, duration_s=seconds, warmup_s=0.0))
        cpu = tree_cpu_s(server.pid) - before
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    samples: collections.Counter[str] = collections.Counter()
    for path in out.glob("*.txt"):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                samples[stage_of(stack)] += int(count)
    answered = stats.completed_total
    total = sum(samples.values()) or 1
    per_request_ms = cpu / max(answered, 1) * 1000
    result = {name: per_request_ms * samples[name] / total for name in [*(n for n, _ in STAGES), OTHER]}
    result["total"] = per_request_ms
    result["req_per_s"] = answered / seconds
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="digits,cifar")
    p.add_argument("--systems", default="nnserve,peer-ort-2")
    p.add_argument("--shape", default="x1", choices=[n for n, s in SHAPES.items() if s.envelope != "series"])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = p.parse_args()
    for model in args.models.split(","):
        rows = {
            s: profile(s, model, args.concurrency, args.seconds, args.data_dir, args.shape)
            for s in args.systems.split(",")
        }
        print(f"\n{model}, {args.shape}, c={args.concurrency}: CPU ms per request by stage")
        print(f"{'stage':34s}" + "".join(f"{s:>14s}" for s in rows))
        for name in [*(n for n, _ in STAGES), OTHER, "total", "req_per_s"]:
            print(f"{name:34s}" + "".join(f"{r[name]:14.3f}" for r in rows.values()))


if __name__ == "__main__":
    main()
