"""Turn a trained run's folder into a servable model version.

From `<version>/checkpoint.pt`: trace TorchScript (`model.pt`), export ONNX (`model.onnx`), check both
against eager PyTorch on real test inputs, evaluate the ONNX file with ONNX Runtime on the real test set,
and write `manifest.json` with that figure. Artifacts are built in a scratch folder and the manifest is
written last, so a failed check leaves no version that the repository would list.
"""

from __future__ import annotations

import io
import platform
import shutil
import warnings
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from models.manifest import (
    MANIFEST_FILE,
    Artifact,
    ImagePreprocessing,
    Manifest,
    Metric,
    SeriesSpec,
    TensorSpec,
    TrainingInfo,
    sha256_file,
)
from models.preprocessing import normalize, to_pixels
from training.checkpoint import load_checkpoint, load_model
from training.config import CifarConfig, ClassifierConfig, SequenceConfig, config_from_dict
from training.data import DataError, class_labels, held_out, load_images, load_weather, on_paper, split_series
from training.metrics import confusion_matrix, forecast_rmse, persistence
from training.nets import Forecaster
from training.plots import plot_confusion

OPSET = 18
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
CONFUSION_FILE = "confusion.png"
ONNX_TOLERANCE = 1e-4  # max |ONNX Runtime - eager| on any output
EVAL_BATCH = 256  # ONNX Runtime batch for the recorded metric; the repository tests evaluate the same way
ON_PAPER_SEED = 0  # the random scale and place of each test digit redrawn on paper


class ExportError(RuntimeError):
    """An exported artifact does not compute what the trained network computes."""


def save_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace (scripting is not needed: no data-dependent control flow) and save."""
    with warnings.catch_warnings():
        # torch 2.14 flags the whole TorchScript API as deprecated; the artifact is still what serving loads.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        # nn.RNN/LSTM/GRU check input and hidden sizes in Python; those hold for every valid input.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.modules\.rnn")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path, axes: dict[int, torch.export.Dim]) -> int:
    """Export with the dynamo exporter, weights inside the file, `axes` dynamic; return the ONNX opset."""
    with warnings.catch_warnings():
        # Emitted by the loop that torch.export makes of LSTM/GRU layers; they concern torch internals only.
        warnings.filterwarnings("ignore", message=r".*_check_is_size will be removed", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"The tensor attributes .* were assigned during export")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=(axes,),
            verbose=False,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(model: nn.Module, folder: Path, inputs: list[np.ndarray]) -> tuple[float, float]:
    """Largest |ONNX Runtime - eager| and |TorchScript - eager| over `inputs`; raise when over the limits."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        scripted = torch.jit.load(str(folder / TORCHSCRIPT_FILE))
    session = ort_session(folder / ONNX_FILE)
    worst_onnx = worst_ts = 0.0
    for x in inputs:
        with torch.no_grad():
            eager = model(torch.from_numpy(x)).numpy()
            traced = scripted(torch.from_numpy(x)).numpy()
        from_onnx = session.run(["output"], {"input": x})[0]
        if from_onnx.shape != eager.shape or traced.shape != eager.shape:
            raise ExportError(
                f"output shapes differ for input {x.shape}: eager {eager.shape}, "
                f"ONNX {from_onnx.shape}, TorchScript {traced.shape}"
            )
        worst_onnx = max(worst_onnx, float(np.abs(from_onnx - eager).max()))
        worst_ts = max(worst_ts, float(np.abs(traced - eager).max()))
        if not np.allclose(traced, eager, rtol=1e-5, atol=1e-6):
            raise ExportError(f"TorchScript differs from eager PyTorch by {worst_ts:.3g} on input {x.shape}")
    if worst_onnx > ONNX_TOLERANCE:
        shapes = ", ".join(str(x.shape) for x in inputs)
        raise ExportError(
            f"ONNX Runtime differs from eager PyTorch by up to {worst_onnx:.3g} "
            f"(limit {ONNX_TOLERANCE:g}) on inputs {shapes}"
        )
    return worst_onnx, worst_ts


def onnx_predictions(
    session: ort.InferenceSession, pictures: Iterable[Image.Image], prep: ImagePreprocessing
) -> np.ndarray:
    """Predicted class of every picture, by ONNX Runtime, preprocessed by `models.preprocessing` as serving does."""
    pixels = np.stack([to_pixels(picture, prep) for picture in pictures])
    chunks = [
        session.run(["output"], {"input": normalize(pixels[i : i + EVAL_BATCH], prep)})[0].argmax(1)
        for i in range(0, len(pixels), EVAL_BATCH)
    ]
    return np.concatenate(chunks)


def as_pictures(images: np.ndarray) -> Iterator[Image.Image]:
    """uint8 [N, C, H, W] as the pictures a client would send (greyscale or RGB)."""
    for image in images:
        yield Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def drawn_digit_metrics(
    session: ort.InferenceSession, digits: np.ndarray, labels: np.ndarray, prep: ImagePreprocessing, dataset: str
) -> list[Metric]:
    """Accuracy on MNIST digits (uint8 [N, 28, 28]) presented as people draw them: inverted, and redrawn large on
    paper as JPEGs. Each picture goes through `models.preprocessing`, a JPEG undecoded until then, as a request's."""
    rng = np.random.default_rng(ON_PAPER_SEED)
    variants = {
        "accuracy_inverted": (
            "test, inverted (255 - x): dark digits on light",
            (Image.fromarray(255 - d) for d in digits),
        ),
        "accuracy_on_paper": (
            "test, redrawn dark on white at a random scale (digit 21-68% of the side) and place in 280x280, "
            f"JPEG quality 90, seed {ON_PAPER_SEED}",
            (Image.open(io.BytesIO(on_paper(d, rng))) for d in digits),
        ),
    }
    return [
        Metric(
            name=name,
            value=round(float((onnx_predictions(session, pictures, prep) == labels).mean()), 6),
            dataset=dataset,
            split=split,
            n_items=len(labels),
        )
        for name, (split, pictures) in variants.items()
    ]


def _libraries(ckpt: dict) -> dict[str, str]:
    libs = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name in ("torchvision", "onnx", "onnxscript", "onnxruntime", "numpy"):
        libs[name] = package_version(name)
    if ckpt["torch"] != libs["torch"]:
        libs["torch (training)"] = ckpt["torch"]
        libs["python (training)"] = ckpt["python"]
    return libs


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_version(version_dir: Path, data_dir: Path) -> Manifest:
    """Export the checkpoint in `version_dir` and write its manifest; the test data is read from `data_dir`."""
    version_dir = Path(version_dir)
    if (version_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"{version_dir / MANIFEST_FILE} exists: this version was exported already")
    ckpt = load_checkpoint(version_dir)
    cfg = config_from_dict(ckpt["task"], {**ckpt["config"], "data_dir": str(data_dir)})
    model = load_model(ckpt)
    scratch = version_dir / ".export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        if isinstance(cfg, SequenceConfig):
            parts = _export_forecaster(model, cfg, ckpt, scratch)  # type: ignore[arg-type]
        else:
            parts = _export_classifier(model, cfg, ckpt, scratch)  # type: ignore[arg-type]
        opset = parts.pop("opset")
        manifest = Manifest(
            name=cfg.name,
            version=version_dir.name,
            architecture=parts.pop("architecture"),
            training=TrainingInfo(
                command=ckpt["command"],
                seed=cfg.seed,
                dataset=ckpt["dataset"],
                n_train_items=ckpt["n_train"],
                epochs=cfg.epochs,  # type: ignore[attr-defined]
                device=ckpt["device"],
                duration_s=round(ckpt["duration_s"], 1),
                config=ckpt["config"],
            ),
            libraries=_libraries(ckpt),
            created_at=datetime.now(UTC),
            artifacts={
                "onnx": Artifact(
                    file=ONNX_FILE,
                    format="onnx",
                    sha256=sha256_file(scratch / ONNX_FILE),
                    bytes=(scratch / ONNX_FILE).stat().st_size,
                    opset=opset,
                ),
                "torchscript": Artifact(
                    file=TORCHSCRIPT_FILE,
                    format="torchscript",
                    sha256=sha256_file(scratch / TORCHSCRIPT_FILE),
                    bytes=(scratch / TORCHSCRIPT_FILE).stat().st_size,
                ),
            },
            **parts,
        )
        for f in scratch.iterdir():
            f.replace(version_dir / f.name)
        tmp = version_dir / f".{MANIFEST_FILE}"
        tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
        tmp.replace(version_dir / MANIFEST_FILE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"exported {cfg.name} v{manifest.version} to {version_dir}", flush=True)
    for m in manifest.metrics[: 3 if manifest.task == "classification" else 2]:
        base = f" (baseline {m.baseline:.4f})" if m.baseline is not None else ""
        print(f"  {m.name} = {m.value:.4f}{base} on {m.dataset}, {m.split}", flush=True)
    return manifest


def _export_classifier(model: nn.Module, cfg: ClassifierConfig, ckpt: dict, scratch: Path) -> dict:
    _, test, dataset = load_images(cfg)
    if dataset.split(" (")[0] != ckpt["dataset"].split(" (")[0]:
        raise DataError(f"{cfg.data_dir} holds {dataset}, but the model was trained on {ckpt['dataset']}")
    images, labels = test.images.numpy(), test.labels.numpy()
    channels, height, width = images.shape[1:]
    prep = ImagePreprocessing(
        color_mode="L" if channels == 1 else "RGB",
        height=int(height),
        width=int(width),
        mean=list(cfg.mean),
        std=list(cfg.std),
        # People draw digits dark on light at any size; the network knows only MNIST's form.
        fit="mnist" if cfg.name == "digits" else "resize",
    )
    example = torch.from_numpy(normalize(images[:8], prep))
    save_torchscript(model, example, scratch / TORCHSCRIPT_FILE)
    opset = save_onnx(model, example, scratch / ONNX_FILE, {0: torch.export.Dim("batch")})
    parity_inputs = [normalize(images[a:b], prep) for a, b in ((0, 1), (100, 107), (500, 564))]
    worst_onnx, worst_ts = check_parity(model, scratch, parity_inputs)
    print(f"parity: max |ONNX - eager| {worst_onnx:.2e}, max |TorchScript - eager| {worst_ts:.2e}", flush=True)

    session = ort_session(scratch / ONNX_FILE)
    predictions = onnx_predictions(session, as_pictures(images), prep)
    acc = float((predictions == labels).mean())
    names = class_labels(cfg.name)
    plot_confusion(
        confusion_matrix(labels, predictions, len(names)),
        names,
        scratch / CONFUSION_FILE,
        f"{cfg.name} v{scratch.parent.name} ({ckpt['arch']}): ONNX accuracy {acc:.2%} on {len(labels):,} test images",
    )
    drawn = drawn_digit_metrics(session, images[:, 0], labels, prep, ckpt["dataset"]) if cfg.name == "digits" else []
    arch = f"{ckpt['arch']}: {type(model).__name__}"
    if isinstance(cfg, CifarConfig) and ckpt["arch"] == "resnet":
        arch = f"{ckpt['arch']}: ResNet-{cfg.resnet_depth} (width {cfg.resnet_width})"
    what = "handwritten digit (0-9)" if cfg.name == "digits" else "CIFAR-10 object class"
    return dict(
        task="classification",
        architecture=f"{arch}, {_param_count(model):,} parameters",
        description=f"Classifies a {height}x{width} {'grayscale' if channels == 1 else 'RGB'} image as a {what}.",
        input=TensorSpec(
            name="input",
            shape=["batch", int(channels), int(height), int(width)],
            layout="NCHW",
            meaning="image scaled to [0, 1], then (x - mean) / std per channel, as in `preprocessing`",
        ),
        output=TensorSpec(
            name="output",
            shape=["batch", len(names)],
            layout="NC",
            meaning="logits, one per label; softmax gives class probabilities",
        ),
        preprocessing=prep,
        labels=names,
        metrics=[
            Metric(
                name="accuracy",
                value=round(acc, 6),
                dataset=ckpt["dataset"],
                split="test",
                n_items=len(labels),
                baseline=None if ckpt["baseline"] is None else round(ckpt["baseline"], 6),
            ),
            *drawn,
        ],
        opset=opset,
    )


def _export_forecaster(model: Forecaster, cfg: SequenceConfig, ckpt: dict, scratch: Path) -> dict:
    splits = split_series(load_weather(cfg.data_dir, cfg.column), cfg)
    test_x, test_y = held_out(splits, cfg, "test")
    example = torch.from_numpy(np.ascontiguousarray(test_x[:4, -64:]))
    save_torchscript(model, example, scratch / TORCHSCRIPT_FILE)
    time_axis = torch.export.Dim("time", min=2, max=cfg.max_history)
    opset = save_onnx(model.exportable(), example, scratch / ONNX_FILE, {0: torch.export.Dim("batch"), 1: time_axis})
    lengths_batches = ((cfg.min_history, 1), (30, 5), (100, 17), (cfg.max_history, len(test_x)))
    parity_inputs = [np.ascontiguousarray(test_x[:b, -n:]) for n, b in lengths_batches]
    worst_onnx, worst_ts = check_parity(model, scratch, parity_inputs)
    print(f"parity: max |ONNX - eager| {worst_onnx:.2e}, max |TorchScript - eager| {worst_ts:.2e}", flush=True)

    predicted = ort_session(scratch / ONNX_FILE).run(["output"], {"input": test_x})[0]
    rmse_7d, rmse_1d = forecast_rmse(predicted, test_y)
    base_7d, base_1d = forecast_rmse(persistence(test_x, cfg.horizon), test_y)
    split = f"{cfg.test_year} ({len(test_x)} forecast origins, {cfg.eval_history}-day histories)"
    target = f"{cfg.column} ({cfg.unit})"
    metrics = [
        Metric(
            name=name,
            value=round(value, 6),
            dataset=ckpt["dataset"],
            split=split,
            n_items=len(test_x),
            baseline=round(baseline, 6),
        )
        for name, value, baseline in (("rmse_7d_avg", rmse_7d, base_7d), ("rmse_1d", rmse_1d, base_1d))
    ] + [
        Metric(**{**m, "value": round(m["value"], 6), "baseline": round(m["baseline"], 6)})
        for m in ckpt["extra_metrics"]
    ]
    return dict(
        task="forecast",
        architecture=f"{model.cell}: {cfg.layers}-layer {model.cell.upper()} ({cfg.hidden} hidden) + linear head, "
        f"{_param_count(model):,} parameters",
        description=f"Forecasts the next {cfg.horizon} days of Seattle's daily maximum temperature from the last "
        f"{cfg.min_history}..{cfg.max_history} days.",
        input=TensorSpec(
            name="input",
            shape=["batch", "time"],
            layout="NT",
            meaning=f"daily {target}, oldest first; one history length per batch",
        ),
        output=TensorSpec(
            name="output",
            shape=["batch", cfg.horizon],
            layout="NT",
            meaning=f"{target} on each of the next {cfg.horizon} days",
        ),
        series=SeriesSpec(min_history=cfg.min_history, max_history=cfg.max_history, horizon=cfg.horizon, target=target),
        metrics=metrics,
        opset=opset,
    )
