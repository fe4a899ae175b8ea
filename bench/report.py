"""Turning measurements into the result record, the printed table, the target checks and the charts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import LoadStats

Result = dict[str, Any]
Run = dict[str, Any]

NNSERVE = ("nnserve", "nnserve-nobatch")
SOAK_GROWTH_LIMIT_PCT = 5.0
RATIOS = (
    ("nnserve/naive", "naive"),
    ("nnserve/litserve-floor", "litserve-floor"),
    ("batching on/off", "nnserve-nobatch"),
)


def summarize(stats: LoadStats, items_per_request: int, ncpu: int) -> dict[str, Any]:
    """One load run as plain numbers: throughput of successful requests, their latency, every error."""
    window = stats.window_s or float("nan")
    lat = np.asarray(stats.latencies_s) * 1000
    pct = dict(zip(("p50", "p95", "p99"), np.percentile(lat, [50, 95, 99]).tolist(), strict=True)) if len(lat) else {}
    return {
        "concurrency": stats.concurrency,
        "items_per_request": items_per_request,
        "duration_s": round(stats.window_s, 3),
        "requests_ok": stats.ok,
        "req_per_s": stats.ok / window,
        "items_per_s": stats.ok * items_per_request / window,
        "latency_ms": {
            **pct,
            "mean": float(lat.mean()) if len(lat) else None,
            "max": float(lat.max()) if len(lat) else None,
        },
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors),
        "client_cpu_cores": stats.client_cpu_s / window,
        "client_cpu_share": stats.client_cpu_s / window / ncpu,
        "server_cpu_cores": stats.server_cpu_s / window,
    }


def find(result: Result, system: str, model: str, items: int, concurrency: int | None = None) -> list[Run]:
    return [
        r
        for r in result["runs"]
        if r["system"] == system
        and r["model"] == model
        and r["items_per_request"] == items
        and (concurrency is None or r["concurrency"] == concurrency)
    ]


def _one(result: Result, system: str, model: str, items: int, concurrency: int) -> Run | None:
    runs = find(result, system, model, items, concurrency)
    return runs[0] if runs else None


def ratios(result: Result) -> list[dict[str, Any]]:
    """nnserve's throughput over each reference, per model and concurrency, where both were measured."""
    out = []
    for run in result["runs"]:
        if run["system"] != "nnserve":
            continue
        row: dict[str, Any] = {k: run[k] for k in ("model", "items_per_request", "concurrency")}
        for label, other in RATIOS:
            ref = _one(result, other, run["model"], run["items_per_request"], run["concurrency"])
            row[label] = run["items_per_s"] / ref["items_per_s"] if ref and ref["items_per_s"] else None
        out.append(row)
    return out


def _check(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    return {"name": name, "status": "SKIP" if ok is None else "PASS" if ok else "FAIL", "detail": detail}


def targets(result: Result) -> list[dict[str, Any]]:
    """The acceptance lines, each PASS/FAIL with its figures, or SKIP when this run did not measure it."""
    out = []
    nn, floor = _one(result, "nnserve", "digits", 1, 32), _one(result, "litserve-floor", "digits", 1, 32)
    if nn and floor:
        share = nn["req_per_s"] / floor["req_per_s"]
        detail = f"{nn['req_per_s']:.0f} vs {floor['req_per_s']:.0f} req/s = {share:.0%}"
        out.append(_check("digits c=32: nnserve >= 90% of LitServe floor req/s", share >= 0.9, detail))
    else:
        out.append(_check("digits c=32: nnserve >= 90% of LitServe floor req/s", None, "not measured"))
    if nn and "p99" in nn["latency_ms"]:
        p99 = nn["latency_ms"]["p99"]
        out.append(_check("digits c=32: nnserve p99 <= 100 ms", p99 <= 100, f"p99 {p99:.1f} ms"))
    else:
        out.append(_check("digits c=32: nnserve p99 <= 100 ms", None, "not measured"))

    multi = [
        r for r in result["runs"] if r["system"] == "nnserve" and r["model"] == "digits" and r["items_per_request"] > 1
    ]
    naive = find(result, "naive", "digits", 1)
    name = "digits multi-item: nnserve items/s >= 5x naive single-image req/s"
    if multi and naive:
        best, ref = max(multi, key=lambda r: r["items_per_s"]), max(naive, key=lambda r: r["req_per_s"])
        detail = (
            f"{best['items_per_s']:.0f} items/s ({best['items_per_request']}/request, c={best['concurrency']}) vs "
            f"{ref['req_per_s']:.0f} req/s (c={ref['concurrency']}) = {best['items_per_s'] / ref['req_per_s']:.1f}x"
        )
        out.append(_check(name, best["items_per_s"] >= 5 * ref["req_per_s"], detail))
    else:
        out.append(_check(name, None, "not measured"))

    on, off, nv = (_one(result, s, "cifar", 1, 64) for s in ("nnserve", "nnserve-nobatch", "naive"))
    name = "cifar c=64: batching >= 1.5x no batching items/s"
    if on and off:
        detail = f"{on['items_per_s']:.0f} vs {off['items_per_s']:.0f} = {on['items_per_s'] / off['items_per_s']:.2f}x"
        out.append(_check(name, on["items_per_s"] >= 1.5 * off["items_per_s"], detail))
    else:
        out.append(_check(name, None, "not measured"))
    name = "cifar c=64: nnserve items/s >= naive"
    if on and nv:
        detail = f"{on['items_per_s']:.0f} vs {nv['items_per_s']:.0f} items/s"
        out.append(_check(name, on["items_per_s"] >= nv["items_per_s"], detail))
    else:
        out.append(_check(name, None, "not measured"))

    nn_runs = [r for r in result["runs"] if r["system"] in NNSERVE]
    wrong = sum(r.get("answer_check", "ok") != "ok" for r in nn_runs)
    errors = sum(r["errors"] for r in nn_runs) + wrong
    detail = f"{errors} errors in {sum(r['requests_ok'] for r in nn_runs)} ok requests ({wrong} wrong answers)"
    out.append(_check("zero errors (nnserve)", errors == 0 if nn_runs else None, detail if nn_runs else "not measured"))

    server = result["servers"].get("nnserve", {})
    backend = result["meta"]["nnserve_env"].get("NNSERVE_BACKEND", "onnx")
    if "peak_rss_mb" in server and backend == "onnx":
        rss = server["peak_rss_mb"]
        detail = f"peak {rss:.0f} MB RSS (PSS {server['peak_pss_mb']:.0f} MB) over {server['processes']} processes"
        out.append(_check("nnserve total server RSS < 600 MB (ONNX)", rss < 600, detail))
    else:
        out.append(_check("nnserve total server RSS < 600 MB (ONNX)", None, "not measured with the ONNX backend"))
    measured = {
        s: result["servers"][s]["torch_loaded"] for s in NNSERVE if "torch_loaded" in result["servers"].get(s, {})
    }
    detail = ", ".join(f"{s}: {'loaded' if t else 'not loaded'}" for s, t in measured.items()) or "not measured"
    out.append(
        _check(
            "torch not imported in nnserve's serving processes",
            not any(measured.values()) if measured else None,
            detail,
        )
    )
    if "soak" in result:
        soak = result["soak"]
        detail = (
            f"RSS {soak['rss_first_mb']:.0f} -> {soak['rss_last_mb']:.0f} MB ({soak['growth_pct']:+.1f}%), "
            f"{soak['errors']} errors"
        )
        ok = soak["growth_pct"] <= SOAK_GROWTH_LIMIT_PCT and soak["errors"] == 0
        out.append(_check(f"soak: RSS growth <= {SOAK_GROWTH_LIMIT_PCT:g}% and no failures", ok, detail))
    return out


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def _rows(result: Result) -> Iterator[str]:
    groups = sorted({(r["model"], r["items_per_request"]) for r in result["runs"]})
    head = (
        f"{'system':<16}{'c':>4}{'req/s':>9}{'items/s':>9}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
        f"{'errors':>7}{'client CPU':>12}{'server CPU':>11}"
    )
    for model, items in groups:
        yield f"\n{model}, {items} item{'s' if items > 1 else ''}/request"
        yield head
        for r in (r for r in result["runs"] if r["model"] == model and r["items_per_request"] == items):
            lat = r["latency_ms"]
            yield (
                f"{r['system']:<16}{r['concurrency']:>4}{_fmt(r['req_per_s']):>9}{_fmt(r['items_per_s']):>9}"
                f"{_fmt(lat.get('p50'), '.1f'):>8}{_fmt(lat.get('p95'), '.1f'):>8}{_fmt(lat.get('p99'), '.1f'):>8}"
                f"{r['errors']:>7}{r['client_cpu_cores']:>7.2f} cpu{r['server_cpu_cores']:>7.2f} cpu"
            )
            if r.get("answer_check", "ok") != "ok":
                yield f"{'':<16}^ wrong answer, figures above do not count: {r['answer_check']}"


def text(result: Result) -> str:
    """The printed report: runs, servers, compute limit, ratios, target checks."""
    meta = result["meta"]
    lines = [
        f"nnserve serving benchmark, {meta['host']} ({meta['cpu_count']} CPUs, {meta['device']}) {meta['timestamp']}",
        f"load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}",
        *_rows(result),
    ]
    if result["servers"]:
        lines += [
            "",
            f"{'server':<16}{'startup s':>10}{'peak RSS MB':>12}{'peak PSS MB':>12}{'processes':>10}"
            f"{'torch':>7}{'stop s':>8}{'orphans':>8}{'killed':>7}",
        ]
        for name, s in result["servers"].items():
            if "error" in s:
                lines.append(f"{name:<16}did not start: {s['error'].splitlines()[0]}")
                continue
            lines.append(
                f"{name:<16}{s['startup_s']:>10.1f}{s['peak_rss_mb']:>12.0f}{s['peak_pss_mb']:>12.0f}"
                f"{s['processes']:>10}{'yes' if s['torch_loaded'] else 'no':>7}"
                f"{s['stop_s']:>8.1f}{s['left_after_main_exit']:>8}{s['killed_after_grace']:>7}"
            )
    if result["compute"]:
        lines += ["", "raw model (ONNX Runtime, 1 intra-op thread): items/s"]
        lines += [
            f"  {c['model']:<10} batch {c['batch']:>3}: {c['items_per_s']:>10.0f}  {c['providers'][0]}"
            for c in result["compute"]
        ]
    if any(row[label] is not None for row in result["ratios"] for label, _ in RATIOS):
        lines += ["", f"{'items/s ratio':<22}{'c':>4}" + "".join(f"{label:>24}" for label, _ in RATIOS)]
        for row in result["ratios"]:
            key = f"{row['model']} x{row['items_per_request']}"
            lines.append(f"{key:<22}{row['concurrency']:>4}" + "".join(f"{_fmt(row[k], '.2f'):>24}" for k, _ in RATIOS))
    if "soak" in result:
        soak = result["soak"]
        lines += [
            "",
            f"soak: {soak['duration_s']:.0f} s at c={soak['concurrency']} on {soak['model']}, {len(soak['samples'])} "
            f"samples; RSS compared over the first and last {soak['window_s']:.0f} s after {soak['warmup_s']:.0f} s",
        ]
    lines += ["", "targets:"]
    lines += [f"  {t['status']:<4} {t['name']}: {t['detail']}" for t in result["targets"]]
    return "\n".join(lines)


def charts(result: Result, out_dir: Path, label: str) -> list[Path]:
    """Throughput and latency against concurrency, one panel per model, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "soak" in result:
        return [_soak_chart(result, out_dir / f"{label}-memory.png", plt)]
    single = [r for r in result["runs"] if r["items_per_request"] == 1]
    models = list(dict.fromkeys(r["model"] for r in single))
    systems = list(dict.fromkeys(r["system"] for r in single))
    concurrencies = sorted({r["concurrency"] for r in single})
    if not models:
        return []
    paths = []
    for kind in ("throughput", "latency"):
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            for i, system in enumerate(systems):
                runs = sorted(
                    (r for r in single if r["system"] == system and r["model"] == model), key=lambda r: r["concurrency"]
                )
                if not runs:
                    continue
                xs = [r["concurrency"] for r in runs]
                color = f"C{i}"
                if kind == "throughput":
                    ax.plot(xs, [r["req_per_s"] for r in runs], "o-", color=color, label=system)
                else:
                    for pct, style in (("p50", "o-"), ("p99", "s--")):
                        ys = [r["latency_ms"].get(pct, float("nan")) for r in runs]
                        ax.plot(xs, ys, style, color=color, label=f"{system} {pct}")
            if kind == "throughput":
                for c in result["compute"]:
                    if c["model"] == model and c["batch"] == 1:
                        ax.axhline(c["items_per_s"], color="gray", ls=":", label="raw model, batch 1, 1 thread")
            ax.set_ylabel("requests/s" if kind == "throughput" else "latency, ms")
            ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.set_xlabel("concurrent requests")
            ax.set_title(f"{model} ({result['meta']['device']})")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{label}-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _soak_chart(result: Result, path: Path, plt: Any) -> Path:
    """Memory and throughput over the soak, to show a leak as a slope rather than one number."""
    samples = result["soak"]["samples"]
    t = [s["t_s"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
    ax.plot(t, [s["rss_mb"] for s in samples], "o-", label="RSS, sum over processes")
    ax.plot(t, [s["pss_mb"] for s in samples], "s-", label="PSS, sum over processes")
    ax.axvline(result["soak"]["warmup_s"], color="gray", ls=":", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    rate = ax.twinx()
    pairs = list(itertools.pairwise(samples))
    rate.plot(
        [b["t_s"] for _, b in pairs],
        [(b["completed"] - a["completed"]) / max(b["t_s"] - a["t_s"], 1e-9) for a, b in pairs],
        color="C2",
        alpha=0.6,
        label="requests/s",
    )
    rate.set_ylabel("requests/s")
    rate.set_ylim(bottom=0)
    fig.legend(loc="outside lower center", ncol=4, fontsize=8)
    ax.set_title(f"soak: nnserve, {result['soak']['model']}, c={result['soak']['concurrency']}")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
