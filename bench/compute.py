"""The compute line: items/s of the bare ONNX Runtime session in-process, no HTTP, no decoding.

Per model: one intra-op thread at each batch size in BATCHES; then, at the best of them, all cores used two
ways, one session with one intra-op thread per core and one single-thread session per core in as many
processes. The compute line is the better of the two: what the cores can do with the model and nothing else,
the ceiling a server's items/s is held against. `measure_again` repeats the winning way alone, beside a server's
point, so the point is held against the machine as it runs then.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 8, 32, 64, 128)
WARMUP_CALLS = 3


def _session(model_path: Path, device: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if device == "cuda":
        from service.runtime import load_cuda_libraries

        load_cuda_libraries()
    return ort.InferenceSession(str(model_path), options, providers=providers)


def _batches(inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    reps = -(-batch // len(inputs))
    pool = np.concatenate([inputs] * reps) if reps > 1 else inputs
    return [np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)]


def _measure(session: Any, input_name: str, batches: list[np.ndarray], seconds: float) -> float:
    for x in batches[:WARMUP_CALLS]:
        session.run(None, {input_name: x})
    items, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for x in batches:
            session.run(None, {input_name: x})
            items += len(x)
    return items / elapsed


def onnx_items_per_s(
    model_path: Path, input_name: str, inputs: np.ndarray, batch: int, seconds: float, device: str, threads: int = 1
) -> tuple[float, list[str]]:
    """Items/s of repeated `session.run` on batches cut from `inputs` (cycled when it holds fewer items), and
    the providers the session really got (ONNX Runtime falls back to the CPU when CUDA is not usable)."""
    session = _session(model_path, device, threads)
    return _measure(session, input_name, _batches(inputs, batch), seconds), session.get_providers()


def _one_of_many(
    model_path: Path, input_name: str, inputs: np.ndarray, batch: int, seconds: float, start: Any, out: Any
) -> None:
    """One process of the per-core measurement: load, warm up, wait for the others, measure."""
    session = _session(model_path, "cpu", 1)
    batches = _batches(inputs, batch)
    for x in batches[:WARMUP_CALLS]:
        session.run(None, {input_name: x})
    start.wait()
    out.put(_measure(session, input_name, batches, seconds))


def per_core_processes(
    model_path: Path, input_name: str, inputs: np.ndarray, batch: int, seconds: float, processes: int
) -> float:
    """Summed items/s of `processes` single-thread sessions, one per process, measuring at the same time."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=_one_of_many, args=(model_path, input_name, inputs, batch, seconds, start, out))
        for _ in range(processes)
    ]
    for w in workers:
        w.start()
    rates = [out.get(timeout=120 + seconds) for _ in workers]
    for w in workers:
        w.join()
    return sum(rates)


@dataclass
class ComputeLine:
    model: str
    items_per_s: float  # the line: the best all-core figure
    batch: int
    how: str
    one_thread: dict[int, float]  # items/s by batch size, one intra-op thread
    providers: list[str]
    all_cores_threads: float | None = None
    all_cores_processes: float | None = None

    def record(self) -> dict[str, Any]:
        return asdict(self)


def compute_line(
    model: str, model_path: Path, input_name: str, inputs: np.ndarray, seconds: float, device: str
) -> ComputeLine:
    """Items/s of the model alone on all cores at its best batch size (on a GPU: one session, best batch)."""
    one_thread, providers = {}, []
    for batch in BATCHES:
        one_thread[batch], providers = onnx_items_per_s(model_path, input_name, inputs, batch, seconds, device)
    best = max(one_thread, key=one_thread.__getitem__)
    if device == "cuda":
        return ComputeLine(model, one_thread[best], best, "one session", one_thread, providers)
    cores = os.cpu_count() or 1
    threads, _ = onnx_items_per_s(model_path, input_name, inputs, best, seconds, device, threads=cores)
    processes = per_core_processes(model_path, input_name, inputs, best, seconds, cores)
    how = f"{cores} intra-op threads" if threads >= processes else f"{cores} processes x 1 thread"
    return ComputeLine(model, max(threads, processes), best, how, one_thread, providers, threads, processes)


def measure_again(
    line: ComputeLine, model_path: Path, input_name: str, inputs: np.ndarray, seconds: float, device: str
) -> float:
    """Items/s of `line` measured once more the way it was found: its batch size, on all cores the way that won
    (on a GPU, the one session)."""
    if line.all_cores_threads is None or line.all_cores_processes is None:
        return onnx_items_per_s(model_path, input_name, inputs, line.batch, seconds, device)[0]
    cores = os.cpu_count() or 1
    if line.all_cores_threads >= line.all_cores_processes:
        return onnx_items_per_s(model_path, input_name, inputs, line.batch, seconds, device, threads=cores)[0]
    return per_core_processes(model_path, input_name, inputs, line.batch, seconds, cores)
