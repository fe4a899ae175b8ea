"""Training loops, and a run: load data, train, save a checkpoint and curves, then export.

A run writes `<out>/<name>/<version>/checkpoint.pt` (state_dict, config, curves, figures of the run) and
`curves.png`; `training.export` turns that folder into a servable version (artifacts + manifest).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.repository import next_version
from training.config import CifarConfig, ClassifierConfig, DigitsConfig, RunConfig, SequenceConfig
from training.data import (
    CIFAR10_LABELS,
    MNIST_LABELS,
    DailySeries,
    DataError,
    ImageSet,
    augment,
    load_cifar10,
    load_mnist,
    load_weather,
    to_input,
    windows,
)
from training.nets import Forecaster, build_classifier
from training.plots import Curves, plot_curves

CHECKPOINT_FILE = "checkpoint.pt"
CURVES_FILE = "curves.png"
CONFIGS: dict[str, type[RunConfig]] = {"digits": DigitsConfig, "cifar": CifarConfig, "sequence": SequenceConfig}
# Fields that say where a run's output goes, not how the model was trained: kept out of the manifest.
_OUTPUT_FIELDS = {"out", "version", "export"}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when a GPU is usable, else the CPU; asking for `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no usable CUDA device")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from; cuDNN picks deterministic kernels (cheap for these nets)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def config_dict(cfg: RunConfig) -> dict[str, object]:
    """The config as JSON-ready values, without the output location."""
    out: dict[str, object] = {}
    for key, value in asdict(cfg).items():
        if key in _OUTPUT_FIELDS:
            continue
        out[key] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(task: str, values: dict[str, object]) -> RunConfig:
    """Rebuild a task's config from `config_dict`'s output, e.g. out of a checkpoint."""
    cls = CONFIGS[task]
    kwargs: dict[str, object] = {}
    for f in fields(cls):
        if f.init and f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    kwargs["data_dir"] = Path(str(kwargs.get("data_dir", ".")))
    return cls(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- classifiers


@dataclass
class Fit:
    """A trained network and its per-epoch curves."""

    model: nn.Module
    curves: Curves
    duration_s: float


def load_images(cfg: ClassifierConfig) -> tuple[ImageSet, ImageSet, str]:
    """Train and test sets for a classifier config, and the data set's name as the manifest records it."""
    if cfg.name == "digits":
        train, test = load_mnist(cfg.data_dir)
        name, full = "MNIST", True
    else:
        train, test, name = load_cifar10(cfg.data_dir)
        full = name == "CIFAR-10"
    total = len(train)
    train = train.head(cfg.max_train_items)
    if len(train) < total:
        return train, test, f"{name} (first {len(train):,} of {total:,} train / {len(test):,} test)"
    return train, test, f"{name} ({'full, ' if full else ''}{len(train):,} train / {len(test):,} test)"


def class_labels(task: str) -> list[str]:
    return list(MNIST_LABELS if task == "digits" else CIFAR10_LABELS)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, cfg: ClassifierConfig) -> torch.Tensor:
    """Eager logits for uint8 images, in evaluation mode, batch by batch."""
    model.eval()
    return torch.cat([model(to_input(chunk, cfg.mean, cfg.std)) for chunk in images.split(cfg.eval_batch_size)])


def accuracy(model: nn.Module, data: ImageSet, cfg: ClassifierConfig) -> float:
    return (predict_logits(model, data.images, cfg).argmax(1) == data.labels).float().mean().item()


def fit_classifier(cfg: ClassifierConfig, train: ImageSet, test: ImageSet, device: torch.device) -> Fit:
    """Train `cfg.arch` with the config's recipe on `train`, held whole on `device`; report test accuracy per epoch."""
    seed_everything(cfg.seed)
    model = build_classifier(cfg.name, cfg.arch, *_resnet_shape(cfg)).to(device)
    train, test = train.to(device), test.to(device)
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train) / cfg.batch_size)
    scheduler = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps)
        if cfg.schedule == "onecycle"
        else None
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    curves: Curves = {"loss": {"train": []}, "accuracy": {"train": [], "test": []}}
    tag = f"{cfg.name}/{cfg.arch}"
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        batches = torch.randperm(len(train), device=device).split(cfg.batch_size)
        for idx in tqdm(batches, desc=f"{tag} epoch {epoch}/{cfg.epochs}", leave=False, unit="batch", disable=None):
            images = augment(train.images[idx], cfg.pad, cfg.flip) if cfg.pad or cfg.flip else train.images[idx]
            labels = train.labels[idx]
            logits = model(to_input(images, cfg.mean, cfg.std))
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == labels).sum()
        curves["loss"]["train"].append(loss_sum.item() / len(train))
        curves["accuracy"]["train"].append(correct.item() / len(train))
        curves["accuracy"]["test"].append(accuracy(model, test, cfg))
        print(
            f"{tag} epoch {epoch:3d}/{cfg.epochs}  loss {curves['loss']['train'][-1]:.4f}  "
            f"train acc {curves['accuracy']['train'][-1]:.2%}  test acc {curves['accuracy']['test'][-1]:.2%}  "
            f"({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    return Fit(model.eval(), curves, time.perf_counter() - start)


def _resnet_shape(cfg: ClassifierConfig) -> tuple[int, int]:
    return (cfg.resnet_depth, cfg.resnet_width) if isinstance(cfg, CifarConfig) else (20, 16)


def _train_classifier(cfg: ClassifierConfig, device: torch.device) -> dict[str, object]:
    train, test, dataset = load_images(cfg)
    print(f"{dataset} on {describe_device(device)}", flush=True)
    fit = fit_classifier(cfg, train, test, device)
    baseline = None
    if cfg.baseline and not cfg.is_seed:
        seed_cfg = type(cfg).recipe(cfg.seed_arch, seed=cfg.seed, max_train_items=cfg.max_train_items)
        print(f"baseline: the seed network {cfg.seed_arch!r} with the seed recipe", flush=True)
        baseline = accuracy(fit_classifier(seed_cfg, train, test, device).model, test.to(device), seed_cfg)
    return dict(
        arch=cfg.arch,
        state_dict=fit.model.state_dict(),
        curves=fit.curves,
        duration_s=fit.duration_s,
        dataset=dataset,
        n_train=len(train),
        baseline=baseline,
        extra_metrics=[],
    )


# ----------------------------------------------------------------------------------------------- forecaster


@dataclass(frozen=True)
class SeriesSplits:
    """Where validation and test targets start in the series; training targets lie before `val_start`."""

    series: DailySeries
    val_start: int
    test_start: int
    test_end: int


def split_series(series: DailySeries, cfg: SequenceConfig) -> SeriesSplits:
    first = series.index_of(date(cfg.train_years[0], 1, 1))
    if first != 0:
        series = DailySeries(series.dates[first:], series.values[first:], series.description)
    test_start = series.index_of(date(cfg.test_year, 1, 1))
    test_end = series.index_of(date(cfg.test_year, 12, 31)) + 1
    if test_start != series.index_of(date(cfg.train_years[1], 12, 31)) + 1:
        raise DataError(f"the test year {cfg.test_year} must follow the training years {cfg.train_years}")
    return SeriesSplits(series, test_start - cfg.val_days, test_start, test_end)


def held_out(splits: SeriesSplits, cfg: SequenceConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every window whose `horizon` targets all fall in the split, each with an `eval_history`-day history."""
    first, end = (splits.val_start, splits.test_start) if split == "val" else (splits.test_start, splits.test_end)
    origins = np.arange(first - 1, end - cfg.horizon)
    return windows(splits.series.values, origins, cfg.eval_history, cfg.horizon)


def forecast_rmse(predictions: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """RMSE over all horizon steps pooled, and at one day ahead."""
    err = predictions.astype(np.float64) - targets.astype(np.float64)
    return float(np.sqrt((err**2).mean())), float(np.sqrt((err[:, 0] ** 2).mean()))


def persistence(histories: np.ndarray, horizon: int) -> np.ndarray:
    """The naive forecast to beat: every future day equals the last one seen."""
    return np.repeat(histories[:, -1:], horizon, axis=1)


@torch.no_grad()
def forecast(model: nn.Module, histories: np.ndarray) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    return model(torch.from_numpy(histories).to(device)).cpu().numpy()


def fit_forecaster(cfg: SequenceConfig, cell: str, splits: SeriesSplits, device: torch.device) -> Fit:
    """Train on random windows whose length is drawn per batch from [min_history, max_history].

    Drawing the length at random puts every history length serving accepts in the training distribution;
    windows of one batch share a length, so no padding is needed.
    """
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = Forecaster(cell, cfg.hidden, cfg.layers, cfg.horizon, cfg.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * cfg.steps_per_epoch
    )
    values = torch.from_numpy(splits.series.values).to(device)
    last_origin = splits.val_start - 1 - cfg.horizon
    if last_origin < cfg.max_history - 1:
        raise DataError(f"{splits.series.description}: too few training days for {cfg.max_history}-day histories")
    val_x, val_y = held_out(splits, cfg, "val")
    curves: Curves = {"train RMSE": {cell: []}, "validation RMSE, 7-day average": {cell: []}}
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        for _ in tqdm(range(cfg.steps_per_epoch), desc=f"{cell} epoch {epoch}/{cfg.epochs}", leave=False, disable=None):
            length = int(rng.integers(cfg.min_history, cfg.max_history + 1))
            origins = rng.integers(length - 1, last_origin + 1, size=cfg.batch_size)
            index = torch.from_numpy(origins[:, None] + np.arange(-length + 1, cfg.horizon + 1)).to(device)
            window = values[index]
            loss = nn.functional.mse_loss(model(window[:, :length]), window[:, length:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
        curves["train RMSE"][cell].append(math.sqrt(loss_sum.item() / cfg.steps_per_epoch))
        curves["validation RMSE, 7-day average"][cell].append(forecast_rmse(forecast(model, val_x), val_y)[0])
        print(
            f"{cell} epoch {epoch:3d}/{cfg.epochs}  train rmse {curves['train RMSE'][cell][-1]:.3f}  "
            f"val rmse (7-day avg) {curves['validation RMSE, 7-day average'][cell][-1]:.3f}  "
            f"({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    return Fit(model.eval(), curves, time.perf_counter() - start)


def _train_sequence(cfg: SequenceConfig, device: torch.device) -> dict[str, object]:
    splits = split_series(load_weather(cfg.data_dir, cfg.column), cfg)
    test_x, test_y = held_out(splits, cfg, "test")
    val_x, val_y = held_out(splits, cfg, "val")
    test_desc = f"{cfg.test_year} ({len(test_x)} forecast origins, {cfg.eval_history}-day histories)"
    val_desc = f"last {cfg.val_days} days of {cfg.train_years[1]} (validation, {len(val_x)} forecast origins)"
    dataset = f"{splits.series.description}, {cfg.train_years[0]}-{cfg.test_year}"
    print(f"{dataset} on {describe_device(device)}", flush=True)
    base_7d, base_1d = forecast_rmse(persistence(test_x, cfg.horizon), test_y)
    val_base_7d = forecast_rmse(persistence(val_x, cfg.horizon), val_y)[0]
    print(f"persistence on {test_desc}: rmse 7-day avg {base_7d:.3f}, 1-day {base_1d:.3f}", flush=True)
    fits: dict[str, Fit] = {}
    val_scores: dict[str, float] = {}
    extra: list[dict[str, object]] = []
    for cell in cfg.cells:
        fit = fits[cell] = fit_forecaster(cfg, cell, splits, device)
        val_7d = val_scores[cell] = forecast_rmse(forecast(fit.model, val_x), val_y)[0]
        test_7d, test_1d = forecast_rmse(forecast(fit.model, test_x), test_y)
        print(f"{cell}: val rmse 7-day avg {val_7d:.3f}; test rmse 7-day avg {test_7d:.3f}, 1-day {test_1d:.3f}")
        common = dict(dataset=dataset, n_items=len(test_x), split=test_desc)
        extra.append(
            dict(
                common,
                name=f"val_rmse_7d_avg_{cell}",
                value=val_7d,
                baseline=val_base_7d,
                split=val_desc,
                n_items=len(val_x),
            )
        )
        extra.append(dict(common, name=f"rmse_7d_avg_{cell}", value=test_7d, baseline=base_7d))
    # Chosen on validation days only: the test year stays unseen by every choice.
    best = min(val_scores, key=val_scores.__getitem__)
    if len(fits) > 1:
        print(f"kept {best!r}: the lowest validation RMSE", flush=True)
    curves: Curves = {panel: {c: f.curves[panel][c] for c, f in fits.items()} for panel in fits[best].curves}
    return dict(
        arch=best,
        state_dict=fits[best].model.state_dict(),
        curves=curves,
        duration_s=sum(f.duration_s for f in fits.values()),
        dataset=dataset,
        n_train=splits.val_start,
        baseline=None,
        extra_metrics=extra,
    )


# ---------------------------------------------------------------------------------------------------- a run


def version_dir(out: Path, name: str, version: str | None) -> Path:
    """The folder of a new version: `version` if given and unused, else the next free number."""
    version = version or next_version(out, name)
    if not version.isdigit():
        raise ValueError(f"--version must be a number, got {version!r}")
    path = Path(out) / name / version
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty; pick another --version or remove it")
    return path


def run(cfg: RunConfig, command: str) -> Path:
    """Train per `cfg`, save checkpoint and curves into a new version folder, export unless told not to."""
    device = resolve_device(cfg.device)
    version_dir(cfg.out, cfg.name, cfg.version)  # fail before training, not after
    if isinstance(cfg, SequenceConfig):
        result = _train_sequence(cfg, device)
    elif isinstance(cfg, ClassifierConfig):
        result = _train_classifier(cfg, device)
    else:
        raise TypeError(f"no training for {type(cfg).__name__}")
    path = version_dir(cfg.out, cfg.name, cfg.version)
    path.mkdir(parents=True, exist_ok=True)
    task = cfg.name
    result.update(
        task=task,
        config=config_dict(cfg),
        state_dict={k: v.detach().cpu() for k, v in result["state_dict"].items()},  # type: ignore[union-attr]
        command=command,
        device=describe_device(device),
        torch=str(torch.__version__),
        python=sys.version.split()[0],
    )
    torch.save(result, path / CHECKPOINT_FILE)
    plot_curves(result["curves"], path / CURVES_FILE, f"{task} ({result['arch']}): {result['dataset']}")  # type: ignore[arg-type]
    print(f"checkpoint and curves saved in {path}", flush=True)
    if cfg.export:
        from training.export import export_version

        export_version(path, cfg.data_dir)
    return path
