"""Faults with real processes and real signals: what the server does when a part of it dies, fails to start,
or is asked to stop while it works. Each test asserts the outcome the operations guide promises."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.server import process_tree
from service.runtime import available_cpus
from tests.data import cifar_test_pngs, mnist_test_pngs
from tests.serving import ROOT, RunningServer, group_members, metric_sum, process_name, running_server

PNG = {"Content-Type": "image/png"}


def _named(srv: RunningServer, prefix: str) -> list[int]:
    return [pid for pid in process_tree(srv.process.pid)[1:] if process_name(pid).startswith(prefix)]


@contextmanager
def _load(url: str, model: str, body: bytes, clients: int = 4) -> Iterator[list[tuple[float, int, float]]]:
    """Steady load in threads; yields the (start time, status or -1 for a transport error, seconds) of each."""
    results: list[tuple[float, int, float]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    status = http.post(f"{url}/v1/{model}/predict", content=body, headers=PNG).status_code
                except httpx.TransportError:
                    status = -1
                results.append((start, status, time.monotonic() - start))
                time.sleep(0.01)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        stop.set()
        for t in threads:
            t.join(70)


def _assert_no_leftovers(srv: RunningServer, within: float = 10.0) -> None:
    """Every process the server started is gone (found by its process group, whoever its parent is now)."""
    deadline = time.monotonic() + within
    while (left := group_members(srv.process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"left running: {[(pid, process_name(pid)) for pid in left]}"


def _last_nnserve_line(output: str) -> str:
    return [line for line in output.splitlines() if " nnserve " in line][-1]


# --- an HTTP server process dies (inline mode, the CPU default) ------------------------------------------------
def test_killed_http_server_is_replaced_and_readiness_follows() -> None:
    digit = mnist_test_pngs(1)[0][0]
    with running_server() as srv:
        http_servers = _named(srv, "nnserve-http-")
        default = max(2, available_cpus())  # NNSERVE_API_SERVERS unset: one per CPU on a CPU, at least 2
        assert len(http_servers) == default, [process_name(p) for p in process_tree(srv.process.pid)[1:]]
        with _load(srv.url, "digits", digit) as results:
            time.sleep(1)
            os.kill(http_servers[0], signal.SIGKILL)
            killed_at = time.monotonic()
            seen = []
            while time.monotonic() - killed_at < 30:
                seen.append(httpx.get(f"{srv.url}/ready", timeout=5).status_code)
                if seen[-1] == 200 and 503 in seen:
                    break
                time.sleep(0.02)
            time.sleep(1)
        assert 503 in seen and seen[-1] == 200, f"readiness never dropped and came back: {seen[:10]}...{seen[-3:]}"
        replacement = _named(srv, "nnserve-http-")
        assert len(replacement) == default and http_servers[0] not in replacement
        late = [status for start, status, _ in results if start > killed_at + 0.5]
        assert late and set(late) == {200}, f"after the replacement: {sorted(set(late))}"
        # Nothing counted in flight is left behind by the dead process.
        metrics = httpx.get(f"{srv.url}/metrics").text
        stuck = [line for line in metrics.splitlines() if line.startswith("nnserve_items_in_flight{")]
        assert all(float(line.split()[-1]) == 0 for line in stuck), stuck
    assert srv.process.returncode == 0


# --- a worker dies (worker mode, the GPU default) -------------------------------------------------------------
def test_killed_worker_answers_held_requests_at_once_and_the_server_exits_non_zero() -> None:
    pngs = [b for b, _ in cifar_test_pngs()[:64]]
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    with running_server(NNSERVE_EXECUTION="worker", NNSERVE_API_SERVERS="1") as srv:
        workers = _named(srv, "worker-cifar")
        assert len(workers) == 1

        def send(_: int) -> tuple[int, float]:
            start = time.monotonic()
            try:
                return httpx.post(f"{srv.url}/v1/cifar/predict", files=files, timeout=40).status_code, start
            except httpx.TransportError:
                return -1, start

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(send, i) for i in range(16)]
            time.sleep(1.0)
            os.kill(workers[0], signal.SIGKILL)
            killed_at = time.monotonic()
            answers = [f.result() for f in futures]
        finished = time.monotonic() - killed_at
        assert finished < 10, f"held requests took {finished:.1f} s after the kill"
        statuses = {status for status, _ in answers}
        assert statuses <= {200, 503, -1} and 503 in statuses, statuses
        code = srv.process.wait(timeout=30)
        assert code == 1
        assert "worker 0 died" in _last_nnserve_line(srv.output())
        _assert_no_leftovers(srv)


def test_killed_http_server_in_worker_mode_ends_the_server_non_zero() -> None:
    with running_server(NNSERVE_EXECUTION="worker", NNSERVE_MODELS="digits") as srv:
        os.kill(_named(srv, "nnserve-http-")[0], signal.SIGKILL)
        assert srv.process.wait(timeout=30) == 1
        assert "HTTP server" in _last_nnserve_line(srv.output()) and "died" in _last_nnserve_line(srv.output())
        _assert_no_leftovers(srv)


# --- bad artifacts and settings: a loud start-up failure, never a server that lies ----------------------------
def _copy_repository(tmp_path: Path, names: tuple[str, ...] = ("digits",)) -> Path:
    root = tmp_path / "models"
    for name in names:
        shutil.copytree(ROOT / "models" / name / "1", root / name / "1")
    return root


def _rewrite_manifest(folder: Path, change: Callable[[dict], object]) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _swap_onnx(target: Path, source: Path) -> None:
    """A hash-valid artifact of the wrong model: the manifest's sha256 is made to match it."""
    shutil.copy(source, target / "model.onnx")
    digest = hashlib.sha256((target / "model.onnx").read_bytes()).hexdigest()
    _rewrite_manifest(target, lambda m: m["artifacts"]["onnx"].update(sha256=digest))


def _expect_start_failure(srv: RunningServer, needle: str, within: float = 60) -> None:
    code = srv.process.wait(timeout=within)
    assert code != 0
    last = _last_nnserve_line(srv.output())
    assert needle in last, f"last log line: {last}"
    _assert_no_leftovers(srv)


@pytest.mark.parametrize("execution", ["inline", "worker"])
def test_wrong_input_shape_fails_the_start(tmp_path: Path, execution: str) -> None:
    root = _copy_repository(tmp_path)
    _swap_onnx(root / "digits" / "1", ROOT / "models" / "cifar" / "1" / "model.onnx")
    with running_server(wait=False, NNSERVE_MODELS_DIR=str(root), NNSERVE_EXECUTION=execution) as srv:
        _expect_start_failure(srv, "does not match the manifest's input.shape")


def test_preprocessing_that_does_not_fit_the_graph_fails_the_start(tmp_path: Path) -> None:
    root = _copy_repository(tmp_path)

    def rgb(manifest: dict) -> None:  # a manifest consistent in itself, for a graph that takes grey images
        manifest["preprocessing"].update(color_mode="RGB", mean=[0.1307] * 3, std=[0.3081] * 3, fit="resize")
        manifest["input"]["shape"] = ["batch", 3, 28, 28]

    _rewrite_manifest(root / "digits" / "1", rgb)
    with running_server(wait=False, NNSERVE_MODELS_DIR=str(root)) as srv:
        _expect_start_failure(srv, "does not match the manifest's input.shape")


def test_torchscript_without_torch_fails_the_start(tmp_path: Path) -> None:
    # A torch that cannot be imported, found first on the path: what a serving image without torch has.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    with running_server(wait=False, NNSERVE_BACKEND="torchscript", PYTHONPATH=path) as srv:
        _expect_start_failure(srv, "torch")


def test_missing_manifest_fails_the_start(tmp_path: Path) -> None:
    root = _copy_repository(tmp_path, ("digits", "cifar"))
    (root / "cifar" / "1" / "manifest.json").unlink()
    with running_server(wait=False, NNSERVE_MODELS_DIR=str(root)) as srv:
        assert srv.process.wait(timeout=30) != 0
        assert "cifar" in srv.output() and "manifest" in srv.output()


# --- shutdown ------------------------------------------------------------------------------------------------
def test_sigterm_finishes_in_flight_work_refuses_new_and_exits_zero() -> None:
    pngs = [b for b, _ in cifar_test_pngs()[:64]]
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    with running_server(NNSERVE_SHUTDOWN_GRACE="20") as srv:

        def send(_: int) -> int:
            try:
                return httpx.post(f"{srv.url}/v1/cifar/predict", files=files, timeout=40).status_code
            except httpx.TransportError:
                return -1

        def accepted() -> float:
            """Requests answered 200 plus those in flight (64 items each)."""
            text = httpx.get(f"{srv.url}/metrics").text
            done = metric_sum(text, 'nnserve_requests_total{endpoint="/v1/cifar/predict",status="200"}')
            return done + metric_sum(text, 'nnserve_items_in_flight{model="cifar"}') / 64

        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(send, i) for i in range(32)]
            deadline = time.monotonic() + 60
            while accepted() < 32 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(srv.process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):  # no longer accepting
                httpx.get(f"{srv.url}/health", timeout=2)
            statuses = [f.result() for f in futures]
        assert statuses.count(200) == 32, statuses
        assert srv.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 25
        _assert_no_leftovers(srv)


def test_killed_supervisor_takes_every_process_with_it() -> None:
    with running_server(NNSERVE_EXECUTION="worker", NNSERVE_MODELS="digits") as srv:
        assert len(_named(srv, "nnserve-http-")) == 2 and len(_named(srv, "worker-digits")) == 1
        os.kill(srv.process.pid, signal.SIGKILL)
        srv.process.wait(timeout=5)
        _assert_no_leftovers(srv, within=30)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{srv.url}/health", timeout=2)


# --- probes ------------------------------------------------------------------------------------------------
def test_probes_need_no_key_and_answer_head() -> None:
    with running_server(NNSERVE_API_KEY="k") as srv:
        assert httpx.get(f"{srv.url}/ready").json() == {"status": "ready", "not_ready": []}
        assert httpx.head(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        info = httpx.get(f"{srv.url}/v1/models/digits", headers={"X-API-Key": "k"}).json()
        assert info["ready"] is True and info["execution"] == "inline"
        assert "libraries" not in info["manifest"]
        assert "data_dir" not in json.dumps(info["manifest"])
