"""The compute limit: items/s of the bare ONNX Runtime session, no HTTP, no decoding.

One intra-op thread on the CPU, so the figure is per core and comparable with a server's items/s per core.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

WARMUP_CALLS = 3


def onnx_items_per_s(
    model_path: Path, input_name: str, inputs: np.ndarray, batch: int, seconds: float, device: str
) -> tuple[float, list[str]]:
    """Items/s of repeated `session.run` on batches cut from `inputs` (cycled when it holds fewer items), and
    the providers the session really got (ONNX Runtime falls back to the CPU when CUDA is not usable)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_path), options, providers=providers)
    reps = -(-batch // len(inputs))
    pool = np.concatenate([inputs] * reps) if reps > 1 else inputs
    batches = [np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)]
    for x in batches[:WARMUP_CALLS]:
        session.run(None, {input_name: x})
    items, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for x in batches:
            session.run(None, {input_name: x})
            items += len(x)
    return items / elapsed, session.get_providers()
