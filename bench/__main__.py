"""`python -m bench`: start each system under test on 127.0.0.1, drive it with a bounded closed-loop load,
stop it, and go on to the next, back to back; then write the results and print the table with target checks."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import models
from bench import report
from bench.compute import onnx_items_per_s
from bench.loadgen import HOST, LoadStats, run, run_load
from bench.payloads import (
    cifar_pngs,
    image_requests,
    mnist_pngs,
    model_inputs,
    series_length,
    series_requests,
    weather_windows,
)
from bench.server import Server, free_port
from bench.systems import SYSTEMS, System

REPO = Path(__file__).resolve().parents[1]
MODELS = ("digits", "cifar", "sequence")
IMAGE_SOURCES = {"digits": mnist_pngs, "cifar": cifar_pngs}
PAYLOADS_PER_MODEL = 512
COMPUTE_BATCHES = (1, 64)
SOAK = {"model": "digits", "concurrency": 32, "duration_s": 300.0, "warmup_s": 30.0, "sample_every_s": 5.0}
CUDA_MAX_BATCH_SIZE = 128


def _csv(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="digits only, c=32, 3 s per run: under a minute")
    p.add_argument("--soak", action="store_true", help="5 minutes of nnserve at c=32 on digits; reports RSS growth")
    p.add_argument("--models", type=_csv(str), default=list(MODELS), help="comma-separated (default: all three)")
    p.add_argument("--systems", type=_csv(str), default=list(SYSTEMS), help=f"comma-separated of: {', '.join(SYSTEMS)}")
    p.add_argument("--concurrency", type=_csv(int), default=[1, 8, 32, 64], help="closed-loop concurrencies")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 10; soak 300)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each run (default 1)")
    p.add_argument("--requests", type=int, default=None, help="measure this many answers (at most --duration s)")
    p.add_argument("--multi-items", type=int, default=64, help="images per multi-item digits request (0: none)")
    p.add_argument("--multi-concurrency", type=_csv(int), default=[1, 8], help="concurrencies of multi-item runs")
    p.add_argument("--compute-seconds", type=float, default=2.0, help="per raw-model measurement (0: skip)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="NNSERVE_DEVICE of the servers")
    p.add_argument("--gpu", dest="device", action="store_const", const="cuda", help="same as --device cuda")
    p.add_argument(
        "--max-batch-size", type=int, default=None, help=f"nnserve's (default: its own; {CUDA_MAX_BATCH_SIZE} on cuda)"
    )
    p.add_argument("--naive-threads", type=int, default=0, help="torch threads of the naive server (0: torch's)")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--models-dir", type=Path, default=models.DEFAULT_ROOT)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    unknown = [s for s in args.systems if s not in SYSTEMS] + [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown system or model: {', '.join(unknown)}")
    if args.max_batch_size is None and args.device == "cuda":
        args.max_batch_size = CUDA_MAX_BATCH_SIZE
    args.multi_systems = args.systems
    if args.quick:
        args.models, args.concurrency, args.multi_concurrency = ["digits"], [32], [8]
        args.multi_systems = ["nnserve"]
        args.duration, args.warmup = args.duration or 3.0, args.warmup if args.warmup is not None else 0.5
        args.compute_seconds = min(args.compute_seconds, 1.0)
    if args.soak:
        args.models, args.systems = [SOAK["model"]], ["nnserve"]
    args.duration = args.duration or (SOAK["duration_s"] if args.soak else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (SOAK["warmup_s"] if args.soak else 1.0)
    return args


@dataclass
class Payloads:
    """Per model: real images (PNG) or series, and the manifest that says how the model takes them."""

    versions: dict[str, models.ModelVersion]
    images: dict[str, list[bytes]] = field(default_factory=dict)
    series: dict[str, list[list[float]]] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: Path, models_dir: Path, names: list[str]) -> Payloads:
        payloads = cls({name: models.load(models_dir, name) for name in names})
        for name, version in payloads.versions.items():
            if name in IMAGE_SOURCES:
                payloads.images[name] = IMAGE_SOURCES[name](data_dir, PAYLOADS_PER_MODEL)
            else:
                length = series_length(version.manifest)
                payloads.series[name] = weather_windows(data_dir, length, PAYLOADS_PER_MODEL)
        return payloads

    def requests(self, system: System, model: str, items: int, port: int) -> list[bytes]:
        if model in self.images:
            return image_requests(model, self.images[model], items, system.image_envelope, port)
        return series_requests(model, self.series[model], port)


def _probe(system: System, model: str, port: int, request: bytes, items: int, timeout: float) -> str | None:
    """One request sent apart from the load: does the answer hold one prediction per item sent? A fast wrong
    answer would otherwise count as throughput. Returns what is wrong, or None."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(request)
            response = http.client.HTTPResponse(sock)
            response.begin()
            status, body = response.status, response.read()
    except (OSError, http.client.HTTPException) as e:
        return f"no answer: {e!r}"
    if not 200 <= status < 300:
        return f"HTTP {status}: {body[:300].decode(errors='replace')}"
    if system.answers_constant:
        return None
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError):
        return f"not a prediction: {body[:300].decode(errors='replace')}"
    if len(predictions) != items:
        return f"{len(predictions)} predictions for {items} items"
    return None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure_compute(args: argparse.Namespace, payloads: Payloads) -> list[dict[str, Any]]:
    """Raw-model items/s, measured before any server starts so nothing else competes for the CPU."""
    out = []
    for name, version in payloads.versions.items():
        inputs = model_inputs(version.manifest, payloads.images.get(name, []), payloads.series.get(name, []))
        for batch in COMPUTE_BATCHES:
            ips, providers = onnx_items_per_s(
                version.artifact_path("onnx"),
                version.manifest.input.name,
                inputs,
                batch,
                args.compute_seconds,
                args.device,
            )
            out.append({"model": name, "batch": batch, "items_per_s": ips, "providers": providers, "threads": 1})
            _log(f"raw model {name} batch {batch}: {ips:.0f} items/s ({providers[0]})")
    return out


def bench_system(args: argparse.Namespace, system: System, payloads: Payloads, result: report.Result) -> None:
    """Start one system, run every (model, items, concurrency) of the plan against it, stop it."""
    port = free_port()
    names = list(payloads.versions)
    cmd = system.command(port, names, args.models_dir, args.device, args.naive_threads)
    env = system.environment(port, names, args.models_dir, args.device, args.max_batch_size)
    log = args.out / "tmp" / f"{system.name}.log"
    server = Server(system.name, cmd, env, port, system.ready_path, log, REPO)
    _log(f"starting {system.name}: {' '.join(cmd[1:])}")
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        _log(f"{system.name} did not start: {e}")
        result["servers"][system.name] = {"error": str(e)}
        return
    ncpu = os.cpu_count() or 1
    try:
        plan = [(m, 1, c) for m in names for c in args.concurrency]
        if "digits" in names and args.multi_items > 1 and system.name in args.multi_systems:
            plan += [("digits", args.multi_items, c) for c in args.multi_concurrency]
        for model, items, concurrency in plan:
            requests = payloads.requests(system, model, items, port)
            problem = _probe(system, model, port, requests[0], items, args.timeout)
            if problem:
                _log(f"  {system.name} {model} x{items}: wrong answer to a single request: {problem}")
            loadavg = _loadavg()
            peak = [0.0]

            def sample(_: LoadStats, peak: list[float] = peak) -> None:
                peak[0] = max(peak[0], server.sample().rss_mb)

            stats = run(
                run_load(
                    port=port,
                    requests=requests,
                    concurrency=concurrency,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    max_requests=args.requests,
                    timeout_s=args.timeout,
                    server_cpu=server.cpu_seconds,
                    sample=sample,
                )
            )
            row = {"system": system.name, "model": model, **report.summarize(stats, items, ncpu)}
            row.update(peak_rss_mb=peak[0], loadavg_before=loadavg, answer_check=problem or "ok")
            result["runs"].append(row)
            _log(
                f"  {system.name:<15} {model:<8} x{items:<3} c={concurrency:<3} {row['req_per_s']:8.0f} req/s "
                f"{row['items_per_s']:8.0f} items/s p99 {row['latency_ms'].get('p99') or float('nan'):7.1f} ms "
                f"errors {row['errors']}  client {row['client_cpu_cores']:.2f} cpu"
                f"  server {row['server_cpu_cores']:.2f} cpu"
            )
            server.check_torch()
    finally:
        server.stop()
    result["servers"][system.name] = server.summary()


def soak(args: argparse.Namespace, payloads: Payloads, result: report.Result) -> None:
    """Long steady load on nnserve; memory growth compares the last minute with the first after warm-up."""
    system, model, concurrency = SYSTEMS["nnserve"], SOAK["model"], SOAK["concurrency"]
    port = free_port()
    names = list(payloads.versions)
    env = system.environment(port, names, args.models_dir, args.device, args.max_batch_size)
    cmd = system.command(port, names, args.models_dir, args.device)
    samples: list[dict[str, float]] = []
    with Server(system.name, cmd, env, port, system.ready_path, args.out / "tmp" / "soak.log", REPO) as server:
        t0 = time.perf_counter()

        def sample(stats: LoadStats) -> None:
            mem = server.sample()
            samples.append(
                {
                    "t_s": round(time.perf_counter() - t0, 2),
                    "rss_mb": mem.rss_mb,
                    "pss_mb": mem.pss_mb,
                    "completed": stats.completed_total,
                    "errors": sum(stats.errors.values()),
                }
            )
            _log(f"  soak t={samples[-1]['t_s']:6.0f}s rss {mem.rss_mb:6.0f} MB  done {stats.completed_total}")

        stats = run(
            run_load(
                port=port,
                requests=payloads.requests(system, model, 1, port),
                concurrency=concurrency,
                duration_s=args.duration - args.warmup,
                warmup_s=args.warmup,
                timeout_s=args.timeout,
                server_cpu=server.cpu_seconds,
                sample=sample,
                sample_every_s=SOAK["sample_every_s"],
            )
        )
        sample(stats)
        server.check_torch()
    row = {"system": system.name, "model": model, **report.summarize(stats, 1, os.cpu_count() or 1)}
    result["runs"].append(row)
    measured = [s for s in samples if s["t_s"] >= args.warmup]
    span = min(60.0, (args.duration - args.warmup) / 3)
    first = [s["rss_mb"] for s in measured if s["t_s"] <= args.warmup + span]
    last = [s["rss_mb"] for s in measured if s["t_s"] >= measured[-1]["t_s"] - span] if measured else []
    rss_first = sum(first) / len(first) if first else float("nan")
    rss_last = sum(last) / len(last) if last else float("nan")
    result["soak"] = {
        "model": model,
        "concurrency": concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "window_s": span,
        "rss_first_mb": rss_first,
        "rss_last_mb": rss_last,
        "growth_pct": (rss_last - rss_first) / rss_first * 100,
        "errors": row["errors"],
        "samples": samples,
    }
    result["servers"][system.name] = server.summary()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("litserve", "fastapi", "uvicorn", "uvloop", "onnxruntime", "onnxruntime-gpu", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    label = args.device + ("-soak" if args.soak else "-quick" if args.quick else "")
    nnserve_env = SYSTEMS["nnserve"].environment(0, args.models, args.models_dir, args.device, args.max_batch_size)
    result: report.Result = {
        "meta": {
            "host": socket.gethostname(),
            "timestamp": started.isoformat(timespec="seconds"),
            "label": label,
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "versions": _versions(),
            "commit": _commit(),
            "loadavg_before": _loadavg(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "nnserve_env": {k: v for k, v in nnserve_env.items() if k.startswith("NNSERVE_") and k != "NNSERVE_PORT"},
            "systems": {s.name: {"what": s.title, "images_as": s.image_envelope} for s in SYSTEMS.values()},
        },
        "compute": [],
        "runs": [],
        "servers": {},
    }
    try:
        payloads = Payloads.load(args.data_dir, args.models_dir, args.models)
    except (models.RepositoryError, OSError, ValueError) as e:
        sys.exit(f"bench: {e}")
    if args.soak:
        try:
            soak(args, payloads, result)
        except (RuntimeError, TimeoutError) as e:
            sys.exit(f"bench: {e}")
    else:
        if args.compute_seconds > 0:
            result["compute"] = measure_compute(args, payloads)
        for name in args.systems:
            bench_system(args, SYSTEMS[name], payloads, result)
    result["meta"]["loadavg_after"] = _loadavg()
    result["meta"]["wall_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["ratios"] = report.ratios(result)
    result["targets"] = report.targets(result)

    args.out.mkdir(parents=True, exist_ok=True)
    stamped = args.out / f"{started.strftime('%Y%m%dT%H%M%SZ')}-{result['meta']['host']}-{label}.json"
    for path in (stamped, args.out / f"latest-{label}.json"):
        path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    written = [stamped, *report.charts(result, args.out, f"latest-{label}")]
    print(report.text(result))
    print("\nwrote " + ", ".join(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
