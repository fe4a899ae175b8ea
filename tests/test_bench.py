"""The benchmark harness: its peer apps answer as nnserve does, its load generator tells refusals from answers,
and a tiny run of every system yields a result that says what produced it. Figures are not judged here."""

from __future__ import annotations

import asyncio
import base64
import copy
import gc
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.loadgen import HOST, REFUSED, run_load
from bench.report import judged_against_compute, summarize, targets
from bench.server import Server, free_port
from bench.systems import catalog
from tests.data import cifar_test_pngs, data_dir, mnist_test_pngs, weather_2015
from tests.serving import ROOT, RunningServer

MODELS = ["digits", "cifar", "sequence"]
# The envelopes each app takes: the tutorial app reads raw images and forms, as its tutorial did.
ENVELOPES = {"peer-ort-2": ("raw", "multipart", "json-b64"), "tutorial": ("raw", "multipart")}


@pytest.fixture(scope="module", params=list(ENVELOPES))
def peer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(name, url) of a peer app started by the harness as a full run starts it, serving the three models."""
    system = catalog(2)[request.param]
    port = free_port()
    argv = system.command(port, MODELS, ROOT / "models", "cpu")
    env = system.environment(port, MODELS, ROOT / "models", "cpu", None)
    log = tmp_path_factory.mktemp(system.name) / "server.log"
    with Server(system.name, argv, env, port, system.ready_path, log, ROOT):
        yield system.name, f"http://{HOST}:{port}"


def _top1(url: str, model: str, pngs: list[bytes], envelope: str) -> list[int]:
    path = f"{url}/v1/{model}/predict"
    if envelope == "raw":
        answers = [httpx.post(path, content=b, headers={"Content-Type": "image/png"}, timeout=60) for b in pngs]
    elif envelope == "multipart":
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
        answers = [httpx.post(path, files=files, timeout=60)]
    else:
        instances = [{"b64": base64.b64encode(b).decode()} for b in pngs]
        answers = [httpx.post(path, json={"instances": instances}, timeout=60)]
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
    return [p["index"] for r in answers for p in r.json()["predictions"]]


def test_peers_answer_as_nnserve_does(server: RunningServer, peer: tuple[str, str]) -> None:
    name, url = peer
    images = {"digits": [b for b, _ in mnist_test_pngs(8)], "cifar": [b for b, _ in cifar_test_pngs()[::60]]}
    for model, pngs in images.items():
        want = _top1(server.url, model, pngs, "raw")
        assert len(want) == len(pngs) >= 8
        for envelope in ENVELOPES[name]:
            assert _top1(url, model, pngs, envelope) == want, (model, envelope)
    window = weather_2015()[:30].tolist()
    forecasts = [
        httpx.post(f"{u}/v1/sequence/predict", json={"series": window}, timeout=60).json()["predictions"][0]["forecast"]
        for u in (server.url, url)
    ]
    assert len(forecasts[1]) == len(forecasts[0]) > 0
    assert np.allclose(forecasts[1], forecasts[0], atol=1e-3)


async def _alternating_server() -> tuple[asyncio.Server, int]:
    """An HTTP/1.1 server that refuses every other request at once (503) and answers the rest after 40 ms."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                count += 1
                if count % 2:
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
                else:
                    await asyncio.sleep(0.04)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    srv = await asyncio.start_server(handle, HOST, 0)
    return srv, srv.sockets[0].getsockname()[1]


def test_load_generator_keeps_refusals_apart() -> None:
    frozen: list[int] = []  # objects out of the generator's garbage collector, sampled while it runs

    async def scenario() -> dict:
        srv, port = await _alternating_server()
        request = f"POST /x HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\nhi".encode()
        async with srv:
            stats = await run_load(
                port=port,
                requests=[request],
                concurrency=4,
                duration_s=1.0,
                warmup_s=0.2,
                sample=lambda _: frozen.append(gc.get_freeze_count()),
            )
        return summarize(stats, 1, os.cpu_count() or 1)

    row = asyncio.run(scenario())
    assert min(frozen) > 1000 and gc.get_freeze_count() == 0  # frozen while it ran, given back after
    assert row["requests_ok"] > 0 and row["refused"] > 0
    assert set(row["statuses"]) == {"200", str(REFUSED)} and row["failures"] == 0 and row["errors"] == 0
    assert row["latency_ms"]["p50"] >= 40.0 > row["refused_latency_ms"]["max"]
    assert row["slowest_ms"][str(REFUSED)] < 40.0 <= row["slowest_ms"]["200"]


def _against_compute(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in targets(result) if "of the compute line" in t["name"]]


def _held_at(result: dict[str, Any], share: float) -> dict[str, Any]:
    """`result` with every judged point given a compute line beside it that the point reaches `share` of."""
    out = copy.deepcopy(result)
    for r in out["runs"]:
        if judged_against_compute(r["model"], r["shape"], r["concurrency"]):
            line = r["items_per_s"] / share
            r["compute_line"] = {"before": line * 0.9, "after": line * 1.1, "items_per_s": line}
    return out


def test_lines_against_the_compute_line_hold_each_point_against_the_line_measured_beside_it() -> None:
    """A point is held against the compute line measured just before and after it, not against the run's line
    measured minutes earlier; the run's line, before and after the systems, stays named in the detail."""
    result = json.loads((ROOT / "bench/results/latest-cpu.json").read_text())  # a full run: every line measured
    peer = result["meta"]["peer"]
    judged = [
        r
        for r in result["runs"]
        if r["system"] in ("nnserve", peer) and judged_against_compute(r["model"], r["shape"], r["concurrency"])
    ]
    assert {r["system"] for r in judged} == {"nnserve", peer}
    for r in judged:  # the committed run measured the line beside each of them
        line = r.get("compute_line")
        assert line and line["before"] > 0 and line["after"] > 0, (r["system"], r["shape"], r["concurrency"])
    for r in result["runs"]:
        r.pop("compute_line", None)
    alone = _against_compute(result)
    assert len(alone) == 6  # cifar single images, and the five cifar shapes of several images
    assert all("beside it" not in t["detail"] and "the run's line" in t["detail"] for t in alone)
    above, below = _against_compute(_held_at(result, 0.86)), _against_compute(_held_at(result, 0.84))
    assert [t["status"] for t in above] == ["PASS"] * 6  # the committed run refused nothing
    assert [t["status"] for t in below] == ["FAIL"] * 6
    for t in above + below:
        assert "beside it" in t["detail"] and "the run's line" in t["detail"], t
    assert ", 86% of " in above[0]["detail"] and "(84% of " in below[1]["detail"]


def test_a_judged_point_measures_the_compute_line_beside_it(tmp_path: Path) -> None:
    """The compute line is measured again before and after each point a target holds against it, with the
    server idle, and the verdict uses that measurement."""
    argv = [sys.executable, "-m", "bench", "--only", "nnserve:cifar:x8-json", "--concurrency", "8"]
    argv += ["--duration", "1", "--warmup", "0.3", "--compute-seconds", "0.1"]
    argv += ["--data-dir", str(data_dir()), "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "latest-cpu-only.json").read_text())
    (row,) = result["runs"]
    line = row["compute_line"]
    assert line["before"] > 0 and line["after"] > 0
    assert line["items_per_s"] == pytest.approx((line["before"] + line["after"]) / 2)
    (verdict,) = (t for t in result["targets"] if t["name"].startswith("cifar x8-json"))
    share = row["items_per_s"] / line["items_per_s"]
    assert f"c=8 {row['items_per_s']:.0f} ({share:.0%} of {line['items_per_s']:.0f} beside it)" in verdict["detail"]
    assert f"compute line beside {line['items_per_s']:.0f}" in done.stderr


def test_tiny_run_of_every_system_records_what_produced_it(tmp_path: Path) -> None:
    systems = list(catalog(2))
    argv = [sys.executable, "-m", "bench", "--systems", ",".join(systems), "--models", "digits"]
    argv += ["--shapes", "x1,x8-json", "--concurrency", "32", "--duration", "1", "--warmup", "0.3"]
    argv += ["--repeats", "3", "--compute-seconds", "0.05", "--data-dir", str(data_dir()), "--out", str(tmp_path)]
    env = {**os.environ, "NNSERVE_API_SERVERS": "2"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "latest-cpu.json").read_text())
    meta = result["meta"]

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert meta["commit"] == head.stdout.strip()
    assert isinstance(meta["tree_clean"], bool) and meta["tree_clean"] == (meta["changed_files"] == [])
    # The source tree names the files as they were: HEAD's own tree exactly when nothing differs from HEAD.
    git = ["git", "-C", str(ROOT)]
    head_tree = subprocess.run([*git, "rev-parse", "HEAD^{tree}"], capture_output=True, text=True, check=True)
    results = subprocess.run([*git, "status", "--porcelain", "bench/results"], capture_output=True, text=True)
    unchanged = meta["tree_clean"] and results.stdout == ""
    assert (meta["source_tree"] == head_tree.stdout.strip()) == unchanged, meta["source_tree"]
    assert {"onnxruntime", "fastapi", "uvicorn", "litserve", "numpy"} <= set(meta["versions"])
    assert meta["cpu_count"] == os.cpu_count() and meta["cpu_model"]
    assert len(meta["loadavg_before"]) == len(meta["loadavg_after"]) == 3
    assert meta["idle"] == (meta["loadavg_before"][0] <= 0.5 * meta["cpu_count"])
    assert ("WARNING" in done.stdout) == (not meta["idle"])
    assert meta["peer"] == "peer-ort-2" and meta["gpus"] == []  # a CPU run names no GPU

    for system in systems:
        runs = [r for r in result["runs"] if r["system"] == system and r["shape"] == "x1"]
        assert len(runs) == 1, system
        assert runs[0]["requests_ok"] > 0 and runs[0]["answer_check"] == "ok", (system, runs[0])
        assert runs[0]["failures"] == 0, (system, runs[0]["failure_kinds"])
    for system in ("nnserve", "peer-ort-2", "peer-ort-1"):
        x8 = [r for r in result["runs"] if r["system"] == system and r["shape"] == "x8-json"]
        assert x8 and x8[0]["items_per_request"] == 8 and x8[0]["answer_check"] == "ok", system
    for system in ("nnserve", "peer-ort-2"):
        stable = next(r for r in result["runs"] if r["system"] == system and r["shape"] == "x1")
        assert len(stable["repeats"]) == 3 and stable["spread_pct"] >= 0

    servers = result["servers"]
    assert {s: servers[s]["torch_loaded"] for s in ("nnserve", "peer-ort-2", "peer-ort-1", "tutorial")} == {
        "nnserve": False,
        "peer-ort-2": False,
        "peer-ort-1": False,
        "tutorial": True,  # the libtorch check sees torch where it is loaded
    }
    assert servers["peer-ort-2"]["processes"] >= 3 and servers["peer-ort-1"]["processes"] == 1
    assert result["compute"][0]["model"] == "digits" and result["compute"][0]["items_per_s"] > 0
    # measured again once every system has stopped, and the report says how far the machine moved meanwhile
    after = result["compute_after"]
    assert [c["model"] for c in after] == ["digits"] and after[0]["items_per_s"] > 0
    moved = after[0]["items_per_s"] / result["compute"][0]["items_per_s"] - 1
    assert f"measured again after the servers ({moved:+.1%})" in done.stdout

    statuses = {t["name"]: t["status"] for t in result["targets"]}
    assert set(statuses.values()) <= {"PASS", "FAIL", "SKIP"}
    assert statuses["digits x1 c=32: nnserve req/s >= peer-ort-2 and p99 <= its p99"] != "SKIP"
    assert statuses["stable: nnserve digits x1 c=32, repeats within 10%"] != "SKIP"
    assert statuses["digits x1 c=256: every request answered 200 or refused 503 within 50 ms"] == "SKIP"
    for shape in ("x1", "x8-json"):
        assert (tmp_path / f"latest-cpu-{shape}.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_splits_a_multi_image_request_by_stage() -> None:
    """`python -m bench.profile` on a real server under real load: py-spy sampled its processes (the stages add up
    to the CPU time /proc measured only when samples came), and a request of 8 digits spends most of that time in
    the model and in decoding."""
    from bench.profile import OTHER, STAGES, profile

    result = profile("nnserve", "digits", concurrency=4, seconds=3, data_dir=data_dir(), shape="x8-multipart")
    stages = [name for name, _ in STAGES] + [OTHER]
    assert result["req_per_s"] > 0 and result["total"] > 0, result
    assert sum(result[s] for s in stages) == pytest.approx(result["total"], rel=1e-6)
    assert result["model"] + result["decode and preprocess"] > result["total"] / 2, result
