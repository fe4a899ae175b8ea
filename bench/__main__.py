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
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import models
from bench import report
from bench.compute import ComputeLine, compute_line, measure_again
from bench.loadgen import HOST, LoadStats, run, run_load
from bench.payloads import (
    SHAPES,
    Shape,
    build_requests,
    cifar_pngs,
    default_data_dir,
    mnist_pngs,
    model_inputs,
    series_length,
    v2_outputs,
    weather_windows,
)
from bench.server import Server, free_port
from bench.systems import System, catalog, peer_name

REPO = Path(__file__).resolve().parents[1]
MODELS = ("digits", "cifar", "sequence")
IMAGE_SOURCES = {"digits": mnist_pngs, "cifar": cifar_pngs}
PAYLOADS_PER_MODEL = 512
# The points measured --repeats times on nnserve and the strong peer: the headline ones.
STABLE_POINTS = {("digits", "x1", 32), ("cifar", "x1", 64)}
# A 1-minute load average above this per core before the run means something else is using the machine.
IDLE_LOAD_PER_CORE = 0.5
SOAK = {"model": "digits", "concurrency": 32, "duration_s": 300.0, "warmup_s": 30.0, "sample_every_s": 5.0}
QUICK = {"models": ["digits"], "shapes": ["x1", "x64-multipart"], "concurrency": [32], "duration": 2.0}
CUDA_MAX_BATCH_SIZE = 128


def _csv(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def _nnserve_http_servers(device: str) -> int:
    """How many HTTP server processes nnserve runs on `device` with the caller's NNSERVE_* settings."""
    from service.config import Settings
    from service.runtime import available_cpus

    return Settings().for_host(device, available_cpus()).api_servers


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="NNSERVE_DEVICE of the servers")
    p.add_argument("--gpu", dest="device", action="store_const", const="cuda", help="same as --device cuda")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # The device decides how many HTTP servers nnserve runs, and so which peer matches it: read it first.
    first = argparse.ArgumentParser(add_help=False)
    _device_options(first)
    http_servers = _nnserve_http_servers(first.parse_known_args(argv)[0].device)
    systems = catalog(http_servers)
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="digits, c=32, 2 s per run, four systems: under a minute")
    mode.add_argument("--soak", action="store_true", help="5 minutes of nnserve at c=32 on digits; reports RSS growth")
    mode.add_argument(
        "--only", metavar="SYSTEM:MODEL:SHAPE", help="one system, model and shape (2 s per run unless --duration)"
    )
    p.add_argument("--systems", type=_csv(str), default=list(systems), help=f"comma-separated of: {', '.join(systems)}")
    p.add_argument("--models", type=_csv(str), default=list(MODELS), help="comma-separated (default: all three)")
    p.add_argument("--shapes", type=_csv(str), default=list(SHAPES), help=f"comma-separated of: {', '.join(SHAPES)}")
    p.add_argument(
        "--concurrency",
        type=_csv(int),
        default=None,
        help="closed-loop concurrencies for every shape (default: 1,8,32,64,256 single items, 8,32,64 multi-item)",
    )
    p.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 10; soak 300)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each run (default 1)")
    p.add_argument("--requests", type=int, default=None, help="measure this many answers (at most --duration s)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each headline point on nnserve and the peer (default 3); with --only, of every point (default 1)",
    )
    p.add_argument(
        "--compute-seconds", type=float, default=None, help="per compute-line measurement (default 1; 0: skip)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as unanswered")
    _device_options(p)
    p.add_argument(
        "--max-batch-size", type=int, default=None, help=f"nnserve's (default: its own; {CUDA_MAX_BATCH_SIZE} on cuda)"
    )
    p.add_argument("--tutorial-threads", type=int, default=0, help="torch threads of the tutorial app (0: torch's)")
    p.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="default: $NNSERVE_DATA_DIR or ../shared/data"
    )
    p.add_argument("--models-dir", type=Path, default=models.DEFAULT_ROOT)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    args.catalog = systems
    args.peer = peer_name(http_servers)
    short = args.quick or args.only
    if args.quick:
        args.models, args.shapes = QUICK["models"], QUICK["shapes"]
        args.concurrency = args.concurrency or QUICK["concurrency"]
        args.systems = ["nnserve", *dict.fromkeys((args.peer, "peer-ort-1")), "tutorial"]
    if args.only:
        parts = args.only.split(":")
        if len(parts) != 3:
            p.error("--only takes SYSTEM:MODEL:SHAPE, e.g. nnserve:cifar:x8-json")
        args.systems, args.models, args.shapes = [parts[0]], [parts[1]], [parts[2]]
    if args.soak:
        args.models, args.systems, args.shapes = [SOAK["model"]], ["nnserve"], ["x1"]
    unknown = (
        [s for s in args.systems if s not in systems]
        + [m for m in args.models if m not in MODELS]
        + [s for s in args.shapes if s not in SHAPES]
    )
    if unknown:
        p.error(f"unknown system, model or shape: {', '.join(unknown)}")
    if args.only and args.shapes[0] not in systems[args.systems[0]].shapes:
        p.error(f"{args.systems[0]} is sent only {', '.join(systems[args.systems[0]].shapes)}")
    if args.max_batch_size is None and args.device == "cuda":
        args.max_batch_size = CUDA_MAX_BATCH_SIZE
    args.duration = args.duration or (SOAK["duration_s"] if args.soak else QUICK["duration"] if short else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (SOAK["warmup_s"] if args.soak else 0.5 if short else 1.0)
    args.repeats = args.repeats or (1 if short else 3)
    if args.compute_seconds is None:
        args.compute_seconds = 0.3 if short else 1.0
    return args


@dataclass
class Payloads:
    """Per model: real images (PNG) or series, and the manifest that says how the model takes them."""

    versions: dict[str, models.ModelVersion]
    images: dict[str, list[bytes]] = field(default_factory=dict)
    series: dict[str, list[list[float]]] = field(default_factory=dict)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)

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

    def takes(self, model: str, shape: Shape) -> bool:
        """Whether `model` takes this shape's items: images for a classifier, series for the forecaster."""
        return shape.images == (model in self.images)

    def requests(self, system: System, model: str, shape: Shape, port: int) -> list[bytes]:
        images, series = self.images.get(model, []), self.series.get(model, [])
        return build_requests(model, shape, images, series, port, json_only=system.json_only)

    def model_inputs(self, model: str) -> np.ndarray:
        """The model's input tensor made from the payloads, as the compute line feeds it (decoded once)."""
        if model not in self.inputs:
            manifest = self.versions[model].manifest
            self.inputs[model] = model_inputs(manifest, self.images.get(model, []), self.series.get(model, []))
        return self.inputs[model]


def _probe(port: int, request: bytes, items: int, timeout: float, constant: bool) -> str | None:
    """One request sent apart from the load: is it answered 2xx, and (unless the system answers a constant)
    does the answer hold one prediction per item sent? A fast wrong answer would otherwise count as
    throughput. Returns what is wrong, or None."""
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
    if constant:
        return None
    if v2 := response.getheader("Inference-Header-Content-Length"):
        rows = v2_outputs(body, v2)
        return None if rows == items else f"{rows} output rows for {items} items"
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


def measure_compute(args: argparse.Namespace, payloads: Payloads, when: str = "") -> list[dict[str, Any]]:
    """The compute line per model, measured while no server runs so nothing else competes for the CPU."""
    out = []
    for name, version in payloads.versions.items():
        path, input_name = version.artifact_path("onnx"), version.manifest.input.name
        line = compute_line(name, path, input_name, payloads.model_inputs(name), args.compute_seconds, args.device)
        out.append(line.record())
        _log(f"compute line{when} {name}: {line.items_per_s:.0f} items/s (batch {line.batch}, {line.how})")
    return out


def _settle(server: Server, timeout_s: float = 30.0) -> None:
    """Wait until the server has finished what the last load left in flight (its CPU use under a twentieth of a core
    over a quarter of a second), so that a measurement beside it competes with nothing."""
    deadline, last = time.monotonic() + timeout_s, server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = server.cpu_seconds()
        if now - last < 0.25 / 20:
            return
        last = now


def measure_beside(args: argparse.Namespace, payloads: Payloads, server: Server, line: dict[str, Any]) -> float:
    """The run's compute line for one model measured again, the way it was found, while `server` idles between
    two of its points. The same 2-core VM measured the line 27% apart before and after the systems of one run."""
    _settle(server)
    version = payloads.versions[line["model"]]
    path, input_name = version.artifact_path("onnx"), version.manifest.input.name
    inputs = payloads.model_inputs(line["model"])
    return measure_again(ComputeLine(**line), path, input_name, inputs, args.compute_seconds, args.device)


def plan(args: argparse.Namespace, system: System, payloads: Payloads) -> list[tuple[str, Shape, int, int]]:
    """(model, shape, concurrency, repeats) of every run a system gets."""
    points = []
    for model in payloads.versions:
        for shape in (SHAPES[name] for name in system.shapes if name in args.shapes):
            if not payloads.takes(model, shape):
                continue
            for c in args.concurrency or shape.concurrency:
                stable = system.name in ("nnserve", args.peer) and (model, shape.name, c) in STABLE_POINTS
                points.append((model, shape, c, args.repeats if stable or args.only else 1))
    return points


def _measure(
    args: argparse.Namespace, server: Server, requests: list[bytes], items: int, concurrency: int
) -> dict[str, Any]:
    """One closed-loop run against a started server: the summary, its peak RSS and the load average before."""
    loadavg, peak = _loadavg(), [0.0]

    def sample(_: LoadStats) -> None:
        peak[0] = max(peak[0], server.sample().rss_mb)

    stats = run(
        run_load(
            port=server.port,
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
    return {**report.summarize(stats, items, os.cpu_count() or 1), "peak_rss_mb": peak[0], "loadavg_before": loadavg}


def bench_system(args: argparse.Namespace, system: System, payloads: Payloads, result: report.Result) -> None:
    """Start one system, run every (model, shape, concurrency) of its plan against it, stop it."""
    port = free_port()
    names = list(payloads.versions)
    cmd = system.command(port, names, args.models_dir, args.device, args.tutorial_threads)
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
    points = plan(args, system, payloads)
    lines = {c["model"]: c for c in result["compute"]} if system.name in ("nnserve", args.peer) else {}
    if not points:
        _log(f"  {system.name}: no model here takes the shapes {', '.join(args.shapes)}")
    try:
        for model, shape, concurrency, repeats in points:
            requests = payloads.requests(system, model, shape, port)
            problem = _probe(port, requests[0], shape.items, args.timeout, system.answers_constant)
            if problem:
                _log(f"  {system.name} {model} {shape.name}: wrong answer to a single request: {problem}")
            line = lines.get(model) if report.judged_against_compute(model, shape.name, concurrency) else None
            before = measure_beside(args, payloads, server, line) if line else None
            summaries = [_measure(args, server, requests, shape.items, concurrency) for _ in range(repeats)]
            row = {"system": system.name, "model": model, "shape": shape.name, **report.with_repeats(summaries)}
            if line and before is not None:
                after = measure_beside(args, payloads, server, line)
                row["compute_line"] = {"before": before, "after": after, "items_per_s": (before + after) / 2}
            row["answer_check"] = problem or "ok"
            result["runs"].append(row)
            p99 = row["latency_ms"]["p99"]
            _log(
                f"  {system.name:<15} {model:<8} {shape.name:<13} c={concurrency:<3} {row['req_per_s']:8.0f} req/s "
                f"{row['items_per_s']:8.0f} items/s p99 {p99 if p99 is not None else float('nan'):7.1f} ms "
                f"503s {row['refused']} errors {row['errors']}  client {row['client_cpu_cores']:.2f} cpu"
                f"  server {row['server_cpu_cores']:.2f} cpu"
                + (f"  spread {row['spread_pct']:.1f}%" if "spread_pct" in row else "")
                + (f"  compute line beside {row['compute_line']['items_per_s']:.0f}" if "compute_line" in row else "")
            )
            server.check_torch()
    finally:
        server.stop()
    result["servers"][system.name] = server.summary()


def soak(args: argparse.Namespace, payloads: Payloads, result: report.Result) -> None:
    """Long steady load on nnserve; memory growth compares the last minute with the first after warm-up."""
    system, model, concurrency = args.catalog["nnserve"], SOAK["model"], SOAK["concurrency"]
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
                    "failures": sum(stats.failures.values()),
                }
            )
            _log(f"  soak t={samples[-1]['t_s']:6.0f}s rss {mem.rss_mb:6.0f} MB  done {stats.completed_total}")

        stats = run(
            run_load(
                port=port,
                requests=payloads.requests(system, model, SHAPES["x1"], port),
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
    row = {"system": system.name, "model": model, "shape": "x1", **report.summarize(stats, 1, os.cpu_count() or 1)}
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
        "errors": row["errors"] + row["refused"],
        "samples": samples,
    }
    result["servers"][system.name] = server.summary()


def _versions() -> dict[str, str]:
    out = {}
    for dist in (
        "litserve",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "python-multipart",
        "onnxruntime",
        "onnxruntime-gpu",
        "torch",
        "numpy",
        "pillow",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _git(*argv: str, env: dict[str, str] | None = None) -> str | None:
    try:
        done = subprocess.run(["git", *argv], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout


def _source_tree() -> str | None:
    """The git tree hash of the files as they are (tracked and untracked, ignored ones apart), built in a scratch
    index so the repository's own index is untouched. It names the code even where HEAD does not: a copy of the
    working tree made on another machine may sit on an older commit, and this hash then equals
    `git rev-parse <commit>^{tree}` of the commit the files came from."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch) / "index")}
        if _git("read-tree", "HEAD", env=env) is None or _git("add", "-A", ".", env=env) is None:
            return None
        tree = _git("write-tree", env=env)
    return tree.strip() if tree else None


def provenance() -> dict[str, Any]:
    """What produced a result: the exact commit, whether the tree had changes (results files apart, since
    every run rewrites them), the machine, and whether it was idle when the run began."""
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    cores = os.cpu_count() or 1
    loadavg = _loadavg()
    idle = loadavg[0] <= IDLE_LOAD_PER_CORE * cores
    return {
        "host": socket.gethostname(),
        "commit": commit.strip() if commit else None,
        "tree_clean": changes == "",
        "changed_files": changes.splitlines() if changes else [],
        "source_tree": _source_tree(),
        "cpu_count": cores,
        "cpu_model": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "loadavg_before": loadavg,
        "idle": idle,
        "idle_note": (
            f"1-minute load average {loadavg[0]} before the run "
            f"{'<=' if idle else '>'} {IDLE_LOAD_PER_CORE} per core on {cores} cores"
            + ("" if idle else ": the machine is busy, these figures are not comparable")
        ),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _gpus() -> list[str]:
    """The GPUs' names and memory as the driver reports them (nvidia-smi, so the harness loads no CUDA library)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _label(args: argparse.Namespace) -> str:
    return args.device + ("-soak" if args.soak else "-quick" if args.quick else "-only" if args.only else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    label = _label(args)
    nnserve = args.catalog["nnserve"]
    nnserve_env = nnserve.environment(0, args.models, args.models_dir, args.device, args.max_batch_size)
    meta = provenance()
    if not meta["idle"]:
        _log(f"WARNING: {meta['idle_note']}; the result is marked idle: false")
    result: report.Result = {
        "meta": {
            **meta,
            "timestamp": started.isoformat(timespec="seconds"),
            "label": label,
            "device": args.device,
            "gpus": _gpus() if args.device == "cuda" else [],
            "models": args.models,
            "peer": args.peer,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "catalog"},
            "nnserve_env": {k: v for k, v in nnserve_env.items() if k.startswith("NNSERVE_") and k != "NNSERVE_PORT"},
            "systems": {
                s.name: {"what": s.title, "command": s.command(0, args.models, args.models_dir, args.device)[1:]}
                for s in args.catalog.values()
                if s.name in args.systems
            },
            "shapes": {name: vars(SHAPES[name]) for name in args.shapes},
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
            bench_system(args, args.catalog[name], payloads, result)
        if args.compute_seconds > 0:
            # The same 2-core VM measured it 12% apart in two runs hours apart, and 27% apart before and after the
            # systems of one run (cifar, 960 and 1,216 images/s): the report says how far it moved meanwhile.
            result["compute_after"] = measure_compute(args, payloads, " after the servers")
    result["meta"]["loadavg_after"] = _loadavg()
    result["meta"]["wall_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["ratios"] = report.ratios(result)
    result["targets"] = report.targets(result)

    args.out.mkdir(parents=True, exist_ok=True)
    stamped = args.out / f"{started.strftime('%Y%m%dT%H%M%SZ')}-{meta['host']}-{label}.json"
    for path in (stamped, args.out / f"latest-{label}.json"):
        path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    written = [stamped, *report.charts(result, args.out, f"latest-{label}")]
    print(report.text(result))
    print("\nwrote " + ", ".join(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
