"""Model runtimes: one ONNX Runtime session or TorchScript module per worker, on CPU or CUDA.

torch is imported only by the TorchScript backend, so the default ONNX path serves without it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

logger = logging.getLogger("nnserve")

Device = Literal["cpu", "cuda"]


class DeviceError(RuntimeError):
    """The configured device cannot be used on this machine."""


class Runtime(Protocol):
    providers: list[str]
    input_shape: list[int | str | None] | None  # as the graph declares it; None when the format does not say

    def run(self, x: np.ndarray) -> np.ndarray: ...


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def _cuda_usable(backend: str, probe: Path) -> tuple[bool, str]:
    """Whether `backend` really runs on a GPU here, and if not, why.

    Cheap checks first (no GPU, no import); then one real session on the GPU with the `probe` model, because a
    listed CUDA provider says nothing of the driver: onnxruntime-gpu lists it always, and falls back to the CPU
    when its CUDA libraries cannot load.
    """
    if _gpu_count() == 0:
        return False, "nvidia-smi lists no GPU"
    if backend == "torchscript":
        import torch

        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False"
        try:
            torch.ones(1, device="cuda").sum().item()
        except RuntimeError as e:
            return False, f"a CUDA tensor operation failed: {e}"
        return True, ""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime has no CUDAExecutionProvider (install the `gpu` extra: onnxruntime-gpu)"
    load_cuda_libraries()
    try:
        session = ort.InferenceSession(str(probe), providers=onnx_providers("cuda"))
    except Exception as e:  # onnxruntime raises its own exception types
        return False, f"a CUDA session could not be created: {e}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return False, f"ONNX Runtime fell back to {session.get_providers()} (driver or CUDA libraries unusable)"
    return True, ""


@functools.cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's CUDA provider needs, once per process.

    The provider finds libcudart, libcublas and libcudnn by soname alone (it has no RUNPATH), so NVIDIA's pip wheels
    (`onnxruntime-gpu[cuda,cudnn]`, what the `gpu` extra installs) sit in site-packages where the loader never
    looks, and every session would fall back to the CPU. `preload_dlls()` (ONNX Runtime 1.21 and later) loads them
    from there, else by the default search path (a CUDA install, or the image's ldconfig entries). It prints what
    it cannot load; that goes to stderr, beside the server's own log lines."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(sys.stderr):
            preload()


def resolve_device(setting: str, backend: str, probe: Path) -> Device:
    """Turn `auto|cpu|cuda` into the device to use: `cuda` without a usable GPU fails loudly, `auto` warns."""
    if setting == "cpu":
        return "cpu"
    usable, why = _cuda_usable(backend, probe)
    if setting == "cuda" and not usable:
        raise DeviceError(f"NNSERVE_DEVICE=cuda but no GPU is usable with the {backend} backend: {why}")
    if not usable and why != "nvidia-smi lists no GPU":
        logger.warning("a GPU is present but unusable (%s); serving on the CPU", why)
    return "cuda" if usable else "cpu"


def threads_per_worker(configured: int, workers_per_model: int) -> int:
    """A model's workers share the cores. Small batches run on one thread (see OnnxRuntime), so models that
    are idle or lightly loaded do not compete; only large batches spread over all of a worker's threads."""
    if configured > 0:
        return configured
    return max(1, available_cpus() // workers_per_model)


def onnx_providers(device: str) -> list[str | tuple[str, dict[str, int]]]:
    if device.startswith("cuda"):
        return [("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def planned_providers(backend: str, device: str) -> list[str]:
    """What a worker will run on, named as its runtime names it (workers refuse to start otherwise)."""
    if backend == "torchscript":
        return [f"torch:{device}"]
    return [p if isinstance(p, str) else p[0] for p in onnx_providers(device)]


# Batches at least this large run on all of a worker's threads; smaller ones on one thread, where a thread pool
# costs more than it gives (for these models, 10-15% slower at batch 1 with two threads than with one).
WIDE_BATCH = 8


class OnnxRuntime:
    def __init__(self, path: Path, device: str, threads: int, arena: bool) -> None:
        on_gpu = device.startswith("cuda")
        self.narrow = self._session(path, device, 1, arena)
        if on_gpu:
            # One session per padded size (`service.api.padded_sizes`): each keeps the one input shape it has run,
            # so neither plans its kernels again when calls alternate between a few rows and 128.
            self.wide = self._session(path, device, 1, arena)
        elif threads > 1:
            self.wide = self._session(path, device, threads, arena)
        else:
            self.wide = self.narrow
        self.providers = self.narrow.get_providers()
        if on_gpu and self.providers[0] != "CUDAExecutionProvider":
            raise DeviceError(f"ONNX Runtime could not start the CUDA provider for {path}; it offered {self.providers}")
        self._input = self.narrow.get_inputs()[0].name
        self.input_shape = list(self.narrow.get_inputs()[0].shape)

    @staticmethod
    def _session(path: Path, device: str, threads: int, arena: bool) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning pool threads would burn cores that other workers and the HTTP servers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        if device.startswith("cuda"):
            load_cuda_libraries()
        else:
            # The arena keeps the largest batch's buffers for good; without it memory follows the load. Always on
            # a GPU, where the CUDA provider's pinned host buffers come from it too. Off, each call maps its
            # activation buffers afresh (449 page faults per 7-row CIFAR-10 call): one session measured 1.88-1.96
            # against 1.75-1.86 ms per CIFAR-10 image, 0.27-0.30 against 0.22-0.24 ms per digit. On, even as one
            # arena shared by a process's sessions and shrunk after the warm-up, each HTTP server held 22-30 MB
            # more under load, and the server's summed RSS peaked at 349 MB against 298 (2-core VM). Off unless
            # `NNSERVE_CPU_MEMORY_ARENA` asks for the speed.
            options.enable_cpu_mem_arena = arena
        return ort.InferenceSession(str(path), options, providers=onnx_providers(device))

    def run(self, x: np.ndarray) -> np.ndarray:
        session = self.wide if len(x) >= WIDE_BATCH else self.narrow
        return session.run(None, {self._input: x})[0]


class TorchScriptRuntime:
    def __init__(self, path: Path, device: str, threads: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice is not the user's concern
            import torch

            torch.set_num_threads(threads)
            self.device = torch.device(device)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self._torch = torch
        self.providers = [f"torch:{self.device.type}"]
        self.input_shape = None

    def run(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.module(self._torch.from_numpy(x).to(self.device)).float().cpu().numpy()


def load_runtime(backend: str, path: Path, device: str, threads: int, arena: bool) -> Runtime:
    """The model's runtime; `arena` turns ONNX Runtime's CPU memory arena on (TorchScript keeps torch's allocator)."""
    if backend == "torchscript":
        return TorchScriptRuntime(path, device, threads)
    return OnnxRuntime(path, device, threads, arena)


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask (`taskset`, `docker --cpuset-cpus`), capped by its cgroup's
    CPU quota (`docker --cpus`, a Kubernetes CPU limit).

    os.cpu_count() counts the host's cores: a container limited to 2 CPUs on a 64-core host would otherwise run
    32 times too many threads and spend its quota being throttled. A fractional quota rounds down (at least 1),
    so the threads never ask for more CPU time than the quota grants."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs granted by the cgroup quota (quota / period): cgroup v2 `cpu.max` ("150000 100000", or "max ..." when
    unlimited), else cgroup v1 `cpu.cfs_quota_us` (-1 when unlimited) and `cpu.cfs_period_us`. None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        v1 = next((d for d in (root / "cpu", root / "cpu,cpuacct") if d.is_dir()), None)
        if v1 is None:
            return None
        try:
            quota, period = ((v1 / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)
