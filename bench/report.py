"""Turning measurements into the result record, the printed table, the target checks and the charts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import REFUSED, LoadStats
from bench.payloads import SHAPES

Result = dict[str, Any]
Run = dict[str, Any]

NNSERVE = ("nnserve", "nnserve-nobatch")
HEADLINE_MODELS = ("digits", "cifar")
HEADLINE_CONCURRENCY = (32, 64)
COMPUTE_SHARE = 0.85
COMPUTE_MODEL = "cifar"
COMPUTE_X1_CONCURRENCY = 64
OVERLOAD_CONCURRENCY = 256
REFUSE_WITHIN_MS = 50.0
RSS_LIMIT_MB = 300.0
ALL_MODELS = {"digits", "cifar", "sequence"}
DIGITS_P99_MS = 50.0
SPREAD_LIMIT_PCT = 10.0
SOAK_GROWTH_LIMIT_PCT = 5.0
NOT_MEASURED = "not measured"


def _percentiles(latencies_s: list[float]) -> dict[str, float | None]:
    lat = np.asarray(latencies_s) * 1000
    if not len(lat):
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    p50, p95, p99 = np.percentile(lat, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(lat.mean()), "max": float(lat.max())}


def summarize(stats: LoadStats, items_per_request: int, ncpu: int) -> dict[str, Any]:
    """One load run as plain numbers: throughput and latency of successful requests, latency of refusals (503)
    apart, and everything else that went wrong."""
    window = stats.window_s or float("nan")
    ok = [x for status, v in stats.latencies_s.items() if 200 <= status < 300 for x in v]
    other = {s: n for s, n in stats.statuses.items() if not (200 <= s < 300 or s == REFUSED)}
    return {
        "concurrency": stats.concurrency,
        "items_per_request": items_per_request,
        "duration_s": round(stats.window_s, 3),
        "requests_ok": len(ok),
        "req_per_s": len(ok) / window,
        "items_per_s": len(ok) * items_per_request / window,
        "latency_ms": _percentiles(ok),
        "refused": stats.statuses.get(REFUSED, 0),
        "refused_latency_ms": _percentiles(stats.latencies_s.get(REFUSED, [])),
        "slowest_ms": {str(s): t * 1000 for s, t in sorted(stats.slowest_s.items())},
        "statuses": {str(s): n for s, n in sorted(stats.statuses.items())},
        "failures": sum(stats.failures.values()),
        "failure_kinds": dict(stats.failures),
        "errors": sum(stats.failures.values()) + sum(other.values()),
        "client_cpu_cores": stats.client_cpu_s / window,
        "client_cpu_share": stats.client_cpu_s / window / ncpu,
        "server_cpu_cores": stats.server_cpu_s / window,
    }


def with_repeats(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one point as one row: the repeat with the median req/s, plus every repeat's figures and their
    spread, (max - min) / min of req/s."""
    ordered = sorted(summaries, key=lambda s: s["req_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    if len(summaries) > 1:
        rates = [s["req_per_s"] for s in summaries]
        row["repeats"] = [{"req_per_s": s["req_per_s"], "p99_ms": s["latency_ms"]["p99"]} for s in summaries]
        row["spread_pct"] = (max(rates) / min(rates) - 1) * 100 if min(rates) > 0 else float("inf")
    return row


def find(result: Result, system: str, model: str, shape: str, concurrency: int | None = None) -> list[Run]:
    return [
        r
        for r in result["runs"]
        if r["system"] == system
        and r["model"] == model
        and r["shape"] == shape
        and (concurrency is None or r["concurrency"] == concurrency)
    ]


def _one(result: Result, system: str, model: str, shape: str, concurrency: int) -> Run | None:
    runs = find(result, system, model, shape, concurrency)
    return runs[0] if runs else None


def _compute(result: Result, model: str, when: str = "compute") -> dict[str, Any] | None:
    """The compute line of `model` as measured before the servers (`compute`) or after them (`compute_after`)."""
    return next((c for c in result.get(when, []) if c["model"] == model), None)


def compute_drift(result: Result, model: str) -> float | None:
    """How far the compute line measured after the servers moved from the one before them, as a fraction; None when
    either is missing."""
    before, after = _compute(result, model), _compute(result, model, "compute_after")
    if before is None or after is None:
        return None
    return after["items_per_s"] / before["items_per_s"] - 1.0


def judged_against_compute(model: str, shape: str, concurrency: int) -> bool:
    """Whether a target holds this point's items/s against the compute line: single images at c=64 and every point
    of several images per request, for cifar."""
    single = shape == "x1" and concurrency == COMPUTE_X1_CONCURRENCY
    return model == COMPUTE_MODEL and (single or SHAPES[shape].multi)


def compute_share(result: Result, run: Run) -> tuple[float, str] | None:
    """`run`'s items/s as a share of the compute line measured beside it (before and after the point, the server
    idle), else of the run's line measured before the systems; and that line, as words. None: no line."""
    if beside := run.get("compute_line"):
        return run["items_per_s"] / beside["items_per_s"], f"{beside['items_per_s']:.0f} beside it"
    line = _compute(result, run["model"])
    return None if line is None else (run["items_per_s"] / line["items_per_s"], f"{line['items_per_s']:.0f}")


def _run_line_note(result: Result, model: str) -> str:
    """The run's own compute line, before and after the systems, so that a machine that changed speed shows."""
    before, drift = _compute(result, model), compute_drift(result, model)
    if before is None:
        return ""
    note = f"; the run's line {before['items_per_s']:.0f} before the systems"
    if drift is not None:
        after = _compute(result, model, "compute_after")
        assert after is not None
        note += f", {after['items_per_s']:.0f} after ({drift:+.0%})"
    return note


def comparisons(result: Result) -> list[tuple[str, str]]:
    """(label, system) of what nnserve's items/s is divided by: the strong peer first."""
    peer = result["meta"]["peer"]
    return [
        (f"/{peer}", peer),
        ("/peer-ort-1", "peer-ort-1"),
        ("/tutorial", "tutorial"),
        ("batching on/off", "nnserve-nobatch"),
        ("/litserve-floor", "litserve-floor"),
    ]


def ratios(result: Result) -> list[dict[str, Any]]:
    """nnserve's items/s over each other system's, per model, shape and concurrency, where both were measured."""
    out = []
    pairs = list(dict.fromkeys(comparisons(result)))
    for run in result["runs"]:
        if run["system"] != "nnserve":
            continue
        row: dict[str, Any] = {k: run[k] for k in ("model", "shape", "concurrency")}
        for label, other in pairs:
            ref = _one(result, other, run["model"], run["shape"], run["concurrency"])
            row[label] = run["items_per_s"] / ref["items_per_s"] if ref and ref["items_per_s"] else None
        out.append(row)
    return out


def _check(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    return {"name": name, "status": "SKIP" if ok is None else "PASS" if ok else "FAIL", "detail": detail}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _against_peer(result: Result) -> Iterator[dict[str, Any]]:
    peer = result["meta"]["peer"]
    for model, c in itertools.product(HEADLINE_MODELS, HEADLINE_CONCURRENCY):
        name = f"{model} x1 c={c}: nnserve req/s >= {peer} and p99 <= its p99"
        nn, ref = _one(result, "nnserve", model, "x1", c), _one(result, peer, model, "x1", c)
        if not (nn and ref):
            yield _check(name, None, NOT_MEASURED)
            continue
        p99, ref_p99 = nn["latency_ms"]["p99"], ref["latency_ms"]["p99"]
        share = nn["req_per_s"] / ref["req_per_s"] if ref["req_per_s"] else float("inf")
        detail = (
            f"{nn['req_per_s']:.0f} vs {ref['req_per_s']:.0f} req/s ({share:.0%}), p99 {_ms(p99)} vs {_ms(ref_p99)}"
        )
        ok = share >= 1 and p99 is not None and (ref_p99 is None or p99 <= ref_p99)
        yield _check(name, ok, detail)


def _against_compute(result: Result) -> Iterator[dict[str, Any]]:
    model, c = COMPUTE_MODEL, COMPUTE_X1_CONCURRENCY
    name = f"{model} x1 c={c}: nnserve items/s >= {COMPUTE_SHARE:.0%} of the compute line"
    nn = _one(result, "nnserve", model, "x1", c)
    measured = compute_share(result, nn) if nn else None
    if not (nn and measured):
        yield _check(name, None, NOT_MEASURED)
        return
    share, line = measured
    detail = f"{nn['items_per_s']:.0f} items/s, {share:.0%} of {line}"
    peer = _one(result, result["meta"]["peer"], model, "x1", c)
    if peer and (theirs := compute_share(result, peer)):
        detail += f" (the peer {theirs[0]:.0%} of {theirs[1]})"
    yield _check(name, share >= COMPUTE_SHARE, detail + _run_line_note(result, model))


def _multi_item(result: Result) -> Iterator[dict[str, Any]]:
    """Every multi-item shape, per model: no refusals; for cifar also items/s near the compute line."""
    for model, shape in itertools.product(HEADLINE_MODELS, (s for s in SHAPES.values() if s.multi)):
        with_compute = model == COMPUTE_MODEL
        name = f"{model} {shape.name} c={','.join(map(str, shape.concurrency))}: zero 503s"
        name += f", items/s >= {COMPUTE_SHARE:.0%} of the compute line" if with_compute else ""
        runs = [r for c in shape.concurrency for r in find(result, "nnserve", model, shape.name, c)]
        shares = [compute_share(result, r) if with_compute else None for r in runs]
        if not runs or (with_compute and None in shares):
            yield _check(name, None, NOT_MEASURED)
            continue
        refused = sum(r["refused"] for r in runs)
        ok, figures = refused == 0, []
        for r, measured in zip(runs, shares, strict=True):
            figure = f"c={r['concurrency']} {r['items_per_s']:.0f}"
            if measured:
                ok = ok and measured[0] >= COMPUTE_SHARE
                figure += f" ({measured[0]:.0%} of {measured[1]})"
            figures.append(figure)
        missing = [c for c in shape.concurrency if not find(result, "nnserve", model, shape.name, c)]
        detail = f"{refused} refused; items/s " + ", ".join(figures)
        detail += _run_line_note(result, model) if with_compute else ""
        detail += f"; not measured at c={','.join(map(str, missing))}" if missing else ""
        # a failure at any measured point fails the line; all passing but some unmeasured is not a pass yet
        yield _check(name, None if ok and missing else ok, detail)


def _overload(result: Result) -> Iterator[dict[str, Any]]:
    for model in HEADLINE_MODELS:
        c = OVERLOAD_CONCURRENCY
        name = f"{model} x1 c={c}: every request answered 200 or refused 503 within {REFUSE_WITHIN_MS:.0f} ms"
        nn = _one(result, "nnserve", model, "x1", c)
        if not nn:
            yield _check(name, None, NOT_MEASURED)
            continue
        slowest_refusal = nn["slowest_ms"].get(str(REFUSED))
        others = {s: n for s, n in nn["statuses"].items() if s not in ("200", str(REFUSED))}
        ok = nn["failures"] == 0 and not others and (slowest_refusal or 0.0) <= REFUSE_WITHIN_MS
        detail = (
            f"{nn['statuses'].get('200', 0)} x 200 (p99 {_ms(nn['latency_ms']['p99'])}), "
            f"{nn['refused']} x 503 (slowest {_ms(slowest_refusal)}), "
            f"other statuses {others or 'none'}, {nn['failures']} without an answer {nn['failure_kinds'] or ''}"
        )
        yield _check(name, ok, detail.rstrip())


def _memory(result: Result) -> Iterator[dict[str, Any]]:
    server = result["servers"].get("nnserve", {})
    name = f"nnserve RSS, three models, <= {RSS_LIMIT_MB:.0f} MB summed over its process tree"
    backend = result["meta"]["nnserve_env"].get("NNSERVE_BACKEND", "onnx")
    if "peak_rss_mb" not in server or set(result["meta"]["models"]) != ALL_MODELS or backend != "onnx":
        yield _check(name, None, "not measured with the three models on the ONNX backend")
    else:
        rss = server["peak_rss_mb"]
        detail = f"peak {rss:.0f} MB RSS (PSS {server['peak_pss_mb']:.0f} MB) over {server['processes']} processes"
        yield _check(name, rss <= RSS_LIMIT_MB, detail)
    measured = {
        s: result["servers"][s]["torch_loaded"] for s in NNSERVE if "torch_loaded" in result["servers"].get(s, {})
    }
    detail = ", ".join(f"{s}: {'mapped' if t else 'not mapped'}" for s, t in measured.items()) or NOT_MEASURED
    yield _check(
        "libtorch mapped by no process of nnserve's tree", not any(measured.values()) if measured else None, detail
    )


def _digits_latency(result: Result) -> Iterator[dict[str, Any]]:
    name = f"digits x1 c=32: nnserve p99 <= {DIGITS_P99_MS:.0f} ms"
    nn = _one(result, "nnserve", "digits", "x1", 32)
    p99 = nn["latency_ms"]["p99"] if nn else None
    yield _check(name, None if p99 is None else p99 <= DIGITS_P99_MS, _ms(p99) if nn else NOT_MEASURED)


def _stability(result: Result) -> Iterator[dict[str, Any]]:
    repeated = [r for r in result["runs"] if len(r.get("repeats", [])) >= 3]
    if not repeated:
        yield _check(f"stable: 3 repeats within {SPREAD_LIMIT_PCT:.0f}%", None, "no point measured 3 times")
    for r in repeated:
        point = f"{r['system']} {r['model']} {r['shape']} c={r['concurrency']}"
        name = f"stable: {point}, repeats within {SPREAD_LIMIT_PCT:.0f}%"
        rates = ", ".join(f"{x['req_per_s']:.0f}" for x in r["repeats"])
        yield _check(name, r["spread_pct"] <= SPREAD_LIMIT_PCT, f"{rates} req/s: spread {r['spread_pct']:.1f}%")


def _errors(result: Result) -> Iterator[dict[str, Any]]:
    nn_runs = [r for r in result["runs"] if r["system"] in NNSERVE]
    wrong = sum(r.get("answer_check", "ok") != "ok" for r in nn_runs)
    errors = sum(r["errors"] for r in nn_runs) + wrong
    detail = f"{errors} errors in {sum(r['requests_ok'] for r in nn_runs)} ok requests ({wrong} wrong answers)"
    yield _check(
        "nnserve: no errors (refusals apart) and no wrong answers",
        errors == 0 if nn_runs else None,
        detail if nn_runs else NOT_MEASURED,
    )


def _soak(result: Result) -> Iterator[dict[str, Any]]:
    if "soak" not in result:
        return
    soak = result["soak"]
    detail = (
        f"RSS {soak['rss_first_mb']:.0f} -> {soak['rss_last_mb']:.0f} MB ({soak['growth_pct']:+.1f}%), "
        f"{soak['errors']} errors"
    )
    ok = soak["growth_pct"] <= SOAK_GROWTH_LIMIT_PCT and soak["errors"] == 0
    yield _check(f"soak: RSS growth <= {SOAK_GROWTH_LIMIT_PCT:g}% and no failures", ok, detail)


def targets(result: Result) -> list[dict[str, Any]]:
    """The acceptance lines, each PASS/FAIL with its figures, or SKIP when this run did not measure it."""
    if "soak" in result:
        return list(_soak(result))
    lines = (_against_peer, _against_compute, _multi_item, _overload, _memory, _digits_latency, _stability, _errors)
    return [check for line in lines for check in line(result)]


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def _rows(result: Result) -> Iterator[str]:
    groups = list(dict.fromkeys((r["model"], r["shape"]) for r in result["runs"]))
    head = (
        f"{'system':<16}{'c':>4}{'req/s':>9}{'items/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'503s':>7}{'503 max':>8}"
        f"{'errors':>7}{'client CPU':>11}{'server CPU':>11}{'spread':>8}"
    )
    for model, shape in groups:
        yield f"\n{model}, {shape} ({SHAPES[shape].items} per request, {SHAPES[shape].envelope})"
        yield head
        for r in (r for r in result["runs"] if r["model"] == model and r["shape"] == shape):
            lat, refused = r["latency_ms"], r["refused_latency_ms"]
            spread = f"{r['spread_pct']:.1f}%" if "spread_pct" in r else ""
            yield (
                f"{r['system']:<16}{r['concurrency']:>4}{_fmt(r['req_per_s']):>9}{_fmt(r['items_per_s']):>9}"
                f"{_fmt(lat['p50'], '.1f'):>8}{_fmt(lat['p99'], '.1f'):>8}{r['refused']:>7}"
                f"{_fmt(refused['max'], '.1f'):>8}{r['errors']:>7}{r['client_cpu_cores']:>7.2f} cpu"
                f"{r['server_cpu_cores']:>7.2f} cpu{spread:>8}"
            )
            if r.get("answer_check", "ok") != "ok":
                yield f"{'':<16}^ wrong answer, figures above do not count: {r['answer_check']}"


def _servers(result: Result) -> Iterator[str]:
    yield (
        f"\n{'server':<16}{'startup s':>10}{'peak RSS MB':>12}{'peak PSS MB':>12}{'processes':>10}"
        f"{'torch':>7}{'stop s':>8}{'orphans':>8}{'killed':>7}"
    )
    for name, s in result["servers"].items():
        if "error" in s:
            yield f"{name:<16}did not start: {s['error'].splitlines()[0]}"
            continue
        yield (
            f"{name:<16}{s['startup_s']:>10.1f}{s['peak_rss_mb']:>12.0f}{s['peak_pss_mb']:>12.0f}"
            f"{s['processes']:>10}{'yes' if s['torch_loaded'] else 'no':>7}"
            f"{s['stop_s']:>8.1f}{s['left_after_main_exit']:>8}{s['killed_after_grace']:>7}"
        )


def text(result: Result) -> str:
    """The printed report: provenance, runs, servers, compute line, ratios, target checks."""
    meta = result["meta"]
    lines = [
        f"nnserve serving benchmark, {meta['host']} ({meta['cpu_count']} x {meta['cpu_model']}, {meta['device']}"
        f"{''.join(f', {gpu}' for gpu in meta.get('gpus', []))}) "
        f"{meta['timestamp']}",
        f"commit {meta['commit']}{'' if meta['tree_clean'] else ' with uncommitted changes'}"
        f"{', source tree ' + meta['source_tree'] if meta.get('source_tree') else ''}; "
        f"load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}",
    ]
    if not meta["idle"]:
        lines.append(f"WARNING: {meta['idle_note']}")
    lines += list(_rows(result))
    if result["servers"]:
        lines += list(_servers(result))
    if result["compute"]:
        lines += ["", "compute line (ONNX Runtime in-process, no HTTP, no decoding): items/s"]
        for c in result["compute"]:
            per_batch = ", ".join(f"{b}: {v:.0f}" for b, v in c["one_thread"].items())
            lines.append(
                f"  {c['model']:<9}{c['items_per_s']:>9.0f}  batch {c['batch']}, {c['how']}  "
                f"(1 thread by batch: {per_batch})"
            )
        for c in result.get("compute_after", []):
            drift = compute_drift(result, c["model"])
            moved = "" if drift is None else f" ({drift:+.1%})"
            lines.append(f"  {c['model']:<9}{c['items_per_s']:>9.0f}  measured again after the servers{moved}")
    pairs = list(dict.fromkeys(comparisons(result)))
    shown = [(label, other) for label, other in pairs if any(row[label] is not None for row in result["ratios"])]
    if shown:
        lines += ["", f"{'nnserve items/s ratio':<28}{'c':>4}" + "".join(f"{label:>17}" for label, _ in shown)]
        for row in result["ratios"]:
            key = f"{row['model']} {row['shape']}"
            lines.append(f"{key:<28}{row['concurrency']:>4}" + "".join(f"{_fmt(row[k], '.2f'):>17}" for k, _ in shown))
    if "soak" in result:
        soak = result["soak"]
        lines += [
            "",
            f"soak: {soak['duration_s']:.0f} s at c={soak['concurrency']} on {soak['model']}, {len(soak['samples'])} "
            f"samples; RSS compared over the first and last {soak['window_s']:.0f} s after {soak['warmup_s']:.0f} s",
        ]
    lines += ["", "targets" + ("" if meta["idle"] else " (machine not idle: figures not comparable)") + ":"]
    lines += [f"  {t['status']:<4} {t['name']}: {t['detail']}" for t in result["targets"] if t["status"] != "SKIP"]
    skipped = [t for t in result["targets"] if t["status"] == "SKIP"]
    if skipped:
        lines.append(f"  not (fully) measured by this run ({len(skipped)}):")
        lines += [f"  SKIP {t['name']}" + ("" if t["detail"] == NOT_MEASURED else f": {t['detail']}") for t in skipped]
    return "\n".join(lines)


def charts(result: Result, out_dir: Path, label: str) -> list[Path]:
    """Per request shape: throughput and p99 latency against concurrency, one panel per model, one line per
    system; multi-item shapes plot items/s against the compute line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "soak" in result:
        return [_soak_chart(result, out_dir / f"{label}-memory.png", plt)]
    systems = list(dict.fromkeys(r["system"] for r in result["runs"]))
    paths = []
    for shape in dict.fromkeys(r["shape"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["shape"] == shape]
        models = list(dict.fromkeys(r["model"] for r in runs))
        fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
        for col, model in enumerate(models):
            _panel(axes[0][col], axes[1][col], result, [r for r in runs if r["model"] == model], systems)
            axes[0][col].set_title(f"{model}, {shape} ({result['meta']['device']})")
        fig.tight_layout()
        path = out_dir / f"{label}-{shape}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _panel(top: Any, bottom: Any, result: Result, runs: list[Run], systems: list[str]) -> None:
    multi = runs[0]["items_per_request"] > 1
    key = "items_per_s" if multi else "req_per_s"
    for i, system in enumerate(systems):
        mine = sorted((r for r in runs if r["system"] == system), key=_concurrency)
        if not mine:
            continue
        xs = [r["concurrency"] for r in mine]
        top.plot(xs, [r[key] or float("nan") for r in mine], "o-", color=f"C{i}", label=system)
        bottom.plot(xs, [r["latency_ms"]["p99"] or float("nan") for r in mine], "s-", color=f"C{i}", label=system)
    line = _compute(result, runs[0]["model"])
    if line and runs[0]["shape"] != "series":
        top.axhline(line["items_per_s"], color="gray", ls=":", label="compute line (items/s)")
    beside = sorted((r for r in runs if r["system"] == "nnserve" and "compute_line" in r), key=_concurrency)
    if beside:
        top.plot(
            [r["concurrency"] for r in beside],
            [r["compute_line"]["items_per_s"] for r in beside],
            "x",
            color="gray",
            label="compute line beside nnserve's points",
        )
    concurrencies = sorted({r["concurrency"] for r in runs})
    for ax, ylabel in ((top, "items/s" if multi else "requests/s"), (bottom, "p99 latency, ms")):
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)


def _concurrency(run: Run) -> int:
    return run["concurrency"]


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
