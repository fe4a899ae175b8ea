"""The committed models: intact artifacts whose ONNX graphs reach, on the real test data, what their manifests say.

Everything here is recomputed from the raw data with numpy, ONNX Runtime and `models.preprocessing` alone,
the way serving computes it, so a manifest figure that the artifact does not reproduce fails.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import models
from models import ModelVersion
from tests.data import cifar_test, mnist_test, weather

CLASSIFIERS = ("digits", "cifar")
ALL = (*CLASSIFIERS, "sequence")
BATCH = 256


def committed(name: str) -> ModelVersion:
    return models.load(models.DEFAULT_ROOT, name, "1")


def session(mv: ModelVersion) -> ort.InferenceSession:
    return ort.InferenceSession(str(mv.artifact_path("onnx")), providers=["CPUExecutionProvider"])


def classifier_inputs(mv: ModelVersion) -> tuple[np.ndarray, np.ndarray]:
    """Stored test images decoded, fitted and normalized per the manifest as serving does it: float32 NCHW, labels."""
    images, labels = mnist_test() if mv.manifest.name == "digits" else cifar_test()
    prep = mv.manifest.preprocessing
    assert prep is not None
    pixels = np.stack([models.to_pixels(Image.fromarray(image), prep) for image in images])
    return models.normalize(pixels, prep), labels


def forecast_windows(mv: ModelVersion) -> tuple[np.ndarray, np.ndarray]:
    """Every 2015 window whose whole horizon lies in 2015, with the history length the manifest evaluated."""
    dates, values = weather()
    spec = mv.manifest.series
    assert spec is not None
    history = int(mv.manifest.training.config["eval_history"])  # type: ignore[arg-type]
    first, end = dates.index("2015-01-01"), dates.index("2015-12-31") + 1
    origins = np.arange(first - 1, end - spec.horizon)
    past = values[origins[:, None] + np.arange(-history + 1, 1)]
    future = values[origins[:, None] + np.arange(1, spec.horizon + 1)]
    return past, future


@pytest.mark.parametrize("name", ALL)
def test_artifacts_match_their_manifest(name: str) -> None:
    mv = committed(name)
    mv.verify()
    assert set(mv.manifest.artifacts) == {"onnx", "torchscript"}
    assert (mv.manifest.artifacts["onnx"].opset or 0) >= 17
    for artifact in mv.manifest.artifacts.values():
        assert (mv.path / artifact.file).stat().st_size == artifact.bytes < 20 * 2**20
    inputs, outputs = session(mv).get_inputs(), session(mv).get_outputs()
    assert [i.name for i in inputs] == ["input"] and [o.name for o in outputs] == ["output"]
    assert inputs[0].shape == mv.manifest.input.shape
    assert outputs[0].shape == mv.manifest.output.shape
    assert mv.manifest.training.command.startswith("python -m training ")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_onnx_reaches_the_recorded_accuracy(name: str) -> None:
    mv = committed(name)
    x, labels = classifier_inputs(mv)
    sess = session(mv)
    predicted = np.concatenate(
        [sess.run(["output"], {"input": x[i : i + BATCH]})[0].argmax(1) for i in range(0, len(x), BATCH)]
    )
    accuracy = float((predicted == labels).mean())
    metric = mv.manifest.metric("accuracy")
    assert metric.n_items == len(labels) == {"digits": 10_000, "cifar": 517}[name]
    assert abs(accuracy - metric.value) <= 0.001
    assert metric.baseline is not None
    if name == "digits":
        assert accuracy >= 0.993
    else:
        assert accuracy - metric.baseline >= 0.10, "the residual net must beat the seed CNN by 10 points"


def test_forecaster_reaches_the_recorded_rmse() -> None:
    mv = committed("sequence")
    past, future = forecast_windows(mv)
    predicted = session(mv).run(["output"], {"input": past})[0].astype(np.float64)
    err = predicted - future
    rmse_7d, rmse_1d = np.sqrt((err**2).mean()), np.sqrt((err[:, 0] ** 2).mean())
    assert len(past) == mv.manifest.metric("rmse_7d_avg").n_items == 359
    assert abs(rmse_7d - mv.manifest.metric("rmse_7d_avg").value) <= 0.01
    assert abs(rmse_1d - mv.manifest.metric("rmse_1d").value) <= 0.01
    persistence = np.sqrt(((future - past[:, -1:]).astype(np.float64) ** 2).mean())
    assert abs(persistence - mv.manifest.metric("rmse_7d_avg").baseline) <= 1e-3  # type: ignore[operator]
    assert rmse_7d <= 0.9 * persistence, "the forecaster must beat persistence by 10%"
    assert {m.name for m in mv.manifest.metrics} >= {f"rmse_7d_avg_{c}" for c in ("rnn", "lstm", "gru")}


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ALL)
def test_torchscript_agrees_with_onnx(name: str) -> None:
    import torch  # only the TorchScript check needs it

    mv = committed(name)
    scripted = torch.jit.load(str(mv.artifact_path("torchscript")))
    sess = session(mv)
    if name == "sequence":
        past, _ = forecast_windows(mv)
        spec = mv.manifest.series
        assert spec is not None
        inputs = [
            np.ascontiguousarray(past[:b, -n:]) for n, b in ((spec.min_history, 3), (90, 1), (spec.max_history, 32))
        ]
    else:
        x, _ = classifier_inputs(mv)
        inputs = [x[:1], x[1:65]]
    for x in inputs:
        with torch.no_grad():
            traced = scripted(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(traced, sess.run(["output"], {"input": x})[0], atol=1e-4, rtol=0)
