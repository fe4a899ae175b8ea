"""Training loops, and a run: load data, train, save a checkpoint and curves.

A run writes `<out>/<name>/<version>/checkpoint.pt` (see `training.checkpoint`) and `curves.png`;
`training.export` then turns that folder into a servable version (artifacts + manifest).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.repository import next_version
from training.checkpoint import save_checkpoint
from training.config import ClassifierConfig, RunConfig, SequenceConfig, config_dict
from training.data import (
    DataError,
    ImageSet,
    SeriesSplits,
    augment,
    held_out,
    load_images,
    load_weather,
    split_series,
    to_input,
)
from training.metrics import forecast_rmse, persistence
from training.nets import ModelSpec, build_model, model_spec
from training.plots import Curves, plot_curves

CURVES_FILE = "curves.png"


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


# ---------------------------------------------------------------------------------------------- classifiers


@dataclass
class Fit:
    """A trained network, what it is, and its per-epoch curves."""

    model: nn.Module
    spec: ModelSpec
    curves: Curves
    duration_s: float


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
    model = build_model(cfg).to(device)
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
    return Fit(model.eval(), model_spec(cfg), curves, time.perf_counter() - start)


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
        model_class=fit.spec.cls,
        model_args=fit.spec.args,
        state_dict=fit.model.state_dict(),
        curves=fit.curves,
        duration_s=fit.duration_s,
        dataset=dataset,
        n_train=len(train),
        baseline=baseline,
        extra_metrics=[],
    )


# ----------------------------------------------------------------------------------------------- forecaster


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
    one_cell = replace(cfg, cell=cell)
    model = build_model(one_cell).to(device)
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
    return Fit(model.eval(), model_spec(one_cell), curves, time.perf_counter() - start)


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
        model_class=fits[best].spec.cls,
        model_args=fits[best].spec.args,
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
    """Train per `cfg`, save checkpoint and curves into a new version folder; return that folder."""
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
    save_checkpoint(path, result)
    plot_curves(result["curves"], path / CURVES_FILE, f"{task} ({result['arch']}): {result['dataset']}")  # type: ignore[arg-type]
    print(f"checkpoint and curves saved in {path}", flush=True)
    return path
