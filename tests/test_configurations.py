"""Settings and repository layouts on a running server: each claim the README makes, checked where it acts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

import models
from bench.server import process_tree
from service.api import ClassifierAPI
from service.config import Settings
from service.dataplane import ModelState
from service.errors import ApiError
from service.runtime import WIDE_BATCH, OnnxRuntime
from tests.data import mnist_test, mnist_test_pngs
from tests.serving import ROOT, RunningServer, metric_sum, process_name, running_server

PNG = {"Content-Type": "image/png"}


def _metric(srv: RunningServer, name: str) -> float:
    return metric_sum(httpx.get(f"{srv.url}/metrics").text, name)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def _burst(srv: RunningServer, model: str = "digits", n: int = 64, clients: int = 16) -> list[httpx.Response]:
    pngs = [b for b, _ in mnist_test_pngs(n)]
    with ThreadPoolExecutor(clients) as pool:
        return list(
            pool.map(lambda b: httpx.post(f"{srv.url}/v1/{model}/predict", content=b, headers=PNG, timeout=30), pngs)
        )


def test_the_newest_version_is_served(tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "digits" / "1", root / "digits" / "1")
    shutil.copytree(ROOT / "models" / "digits" / "1", root / "digits" / "2")
    manifest = json.loads((root / "digits" / "2" / "manifest.json").read_text())
    manifest["version"] = "2"
    (root / "digits" / "2" / "manifest.json").write_text(json.dumps(manifest))
    with running_server(NNSERVE_MODELS_DIR=str(root)) as srv:
        assert httpx.get(f"{srv.url}/v1/models/digits").json()["version"] == "2"
        digit, label = mnist_test_pngs(1)[0]
        answer = httpx.post(f"{srv.url}/v1/digits/predict", content=digit, headers=PNG).json()
        assert answer["version"] == "2" and answer["predictions"][0]["index"] == label


def test_models_setting_serves_only_the_named_models() -> None:
    with running_server(NNSERVE_MODELS="digits") as srv:
        assert [m["name"] for m in httpx.get(f"{srv.url}/v1/models").json()["models"]] == ["digits"]
        r = httpx.post(f"{srv.url}/v1/cifar/predict", content=b"x", headers=PNG)
        assert r.status_code == 404


def test_max_batch_size_one_turns_batching_off() -> None:
    with running_server(NNSERVE_MAX_BATCH_SIZE="1", NNSERVE_API_SERVERS="1") as srv:
        assert all(r.status_code == 200 for r in _burst(srv))
        calls = _metric(srv, 'nnserve_batch_requests_count{model="digits"}')
        requests = _metric(srv, 'nnserve_batch_requests_sum{model="digits"}')
        assert calls == requests == 64  # one request per model call


def test_two_workers_per_model_are_ready_together_and_both_used() -> None:
    with running_server(
        wait=False, NNSERVE_EXECUTION="worker", NNSERVE_WORKERS_PER_DEVICE="2", NNSERVE_MODELS="digits"
    ) as srv:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{srv.url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                ready = False
            # A worker names itself before it counts as ready, so once ready, both must be there.
            workers = [p for p in process_tree(srv.process.pid)[1:] if process_name(p).startswith("worker-digits")]
            assert not ready or len(workers) == 2, "ready before both workers were"
            if ready:
                break
            time.sleep(0.05)
        assert len(workers) == 2
        before = {pid: _cpu_seconds(pid) for pid in workers}
        for _ in range(4):
            assert all(r.status_code == 200 for r in _burst(srv, n=128, clients=32))
        used = {pid: _cpu_seconds(pid) - before[pid] for pid in workers}
        assert all(seconds > 0 for seconds in used.values()), f"CPU seconds per worker: {used}"


class _FailsOnMarkedRows:
    """A real ONNX Runtime session that raises whenever a batch holds a marked (all-white) image."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path))
        self.providers = self.session.get_providers()
        self.input_shape = self.session.get_inputs()[0].shape

    def run(self, x: np.ndarray) -> np.ndarray:
        if (x.reshape(len(x), -1).min(axis=1) > 2.5).any():  # white after normalization: (1 - 0.1307) / 0.3081
            raise RuntimeError("marked item")
        return self.session.run(None, {"input": x})[0]


@pytest.mark.parametrize(
    ("device", "cpus", "expected"),
    [
        ("cpu", 1, (2, 1)),
        ("cpu", 2, (2, 1)),
        ("cpu", 16, (16, 1)),
        ("cuda", 4, (2, 1)),
        ("cuda", 16, (8, 2)),
        ("cuda", 64, (8, 2)),
    ],
)
def test_process_counts_left_unset_follow_the_host(device: str, cpus: int, expected: tuple[int, int]) -> None:
    chosen = Settings(api_servers=0, workers_per_device=0).for_host(device, cpus)
    assert (chosen.api_servers, chosen.workers_per_device) == expected
    given = Settings(api_servers=3, workers_per_device=5).for_host(device, cpus)
    assert (given.api_servers, given.workers_per_device) == (3, 5)


@pytest.mark.parametrize("arena", ["", "false", "true"])
def test_the_cpu_memory_arena_setting_reaches_both_sessions_of_a_model(
    arena: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NNSERVE_CPU_MEMORY_ARENA turns ONNX Runtime's CPU arena on for the one-thread and the wide session alike;
    unset, it stays off."""
    if arena:
        monkeypatch.setenv("NNSERVE_CPU_MEMORY_ARENA", arena)
    model = models.load(ROOT / "models", "digits")
    api = ClassifierAPI(model, Settings(), "cpu", 2, ModelState(slots=1, http_servers=1))
    api.setup("cpu")
    runtime = api.runtime
    assert isinstance(runtime, OnnxRuntime) and runtime.narrow is not runtime.wide
    on = [s.get_session_options().enable_cpu_mem_arena for s in (runtime.narrow, runtime.wide)]
    assert on == [arena == "true"] * 2
    images, labels = mnist_test()
    answers = api.predict([{"x": images[i][None, None], "top_k": 1} for i in range(WIDE_BATCH)])
    assert [json.loads(api.encode_response(a))["predictions"][0]["index"] for a in answers] == list(labels[:WIDE_BATCH])


def test_a_failing_item_does_not_fail_its_batch_and_gets_a_500() -> None:
    """The worker-side fallback: a batch call that fails is retried request by request."""
    model = models.load(ROOT / "models", "digits")
    api = ClassifierAPI(model, Settings(), "cpu", 1, ModelState(slots=1, http_servers=1))
    api.runtime = _FailsOnMarkedRows(model.artifact_path("onnx"))
    images, labels = mnist_test()
    good = [{"x": images[i][None, None], "top_k": 1} for i in range(6)]
    marked = {"x": np.full((1, 1, 28, 28), 255, dtype=np.uint8), "top_k": 1}
    answers = [api.encode_response(y) for y in api.predict([*good[:3], marked, *good[3:]])]
    assert answers[3] == (500, "internal", "the model failed on this request (RuntimeError)")
    for answer, label in zip(answers[:3] + answers[4:], labels[:6], strict=True):
        assert json.loads(answer)["predictions"][0]["index"] == label
    error = ApiError(*answers[3])  # what the predict route raises for it
    response = error.response()
    assert response.status_code == 500 and json.loads(response.body)["error"]["code"] == "internal"


def test_a_bad_setting_is_one_line_and_exit_code_2() -> None:
    env = {**os.environ, "NNSERVE_MAX_BATCH_SIZE": "many", "NNSERVE_PORT": "80"}
    done = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "nnserve: NNSERVE_PORT='80': Input should be greater than or equal to 1024",
        "nnserve: NNSERVE_MAX_BATCH_SIZE='many': Input should be a valid integer, unable to parse string as an integer",
    ]
    assert "Traceback" not in done.stderr + done.stdout


def test_localhost_is_a_host_and_cors_is_off_unless_configured() -> None:
    with running_server(NNSERVE_HOST="localhost", NNSERVE_MODELS="digits") as srv:
        preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{srv.url}/v1/digits/predict", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with running_server(
        NNSERVE_CORS_ORIGINS="http://example.test", NNSERVE_API_KEY="k", NNSERVE_MODELS="digits"
    ) as srv:
        preflight["Access-Control-Request-Headers"] = "x-api-key,content-type"
        r = httpx.options(f"{srv.url}/v1/digits/predict", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"
        digit, label = mnist_test_pngs(1)[0]
        r = httpx.post(
            f"{srv.url}/v1/digits/predict",
            content=digit,
            headers={**PNG, "Origin": "http://example.test", "X-API-Key": "k"},
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        assert r.json()["predictions"][0]["index"] == label


def test_auto_device_falls_back_when_the_gpu_cannot_run_a_session(tmp_path: Path) -> None:
    """A GPU listed by nvidia-smi is not enough: auto tries a real session, warns and serves on the CPU; cuda
    refuses to start. (Here the GPU is a stand-in nvidia-smi, and this ONNX Runtime has no CUDA provider.)"""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    with running_server(PATH=path, NNSERVE_MODELS="digits") as srv:
        assert httpx.get(f"{srv.url}/v1/models/digits").json()["device"] == "cpu"
        assert "a GPU is present but unusable" in srv.output()
    with running_server(wait=False, PATH=path, NNSERVE_MODELS="digits", NNSERVE_DEVICE="cuda") as srv:
        assert srv.process.wait(timeout=60) == 1
        assert "NNSERVE_DEVICE=cuda but no GPU is usable" in srv.output()
