"""`checkpoint.pt`: what a training run leaves for export, and for anyone who wants the trained network back.

A dict saved with `torch.save`, loadable with `weights_only=True`:
    task           "digits" | "cifar" | "sequence"
    config         the run's config as `training.config.config_dict` writes it
    arch           the network trained: the classifier's `arch`, or the forecaster's cell
    model_class    `training.nets.NETWORKS` key, e.g. "ResNet"
    model_args     every constructor argument of `model_class`, defaults included
    state_dict     the weights, on the CPU
    curves         per-epoch training curves (panel -> line -> values)
    duration_s     training time in seconds
    dataset        the training data as the manifest names it
    n_train        number of training items
    baseline       the seed network's test accuracy (classifiers), or None
    extra_metrics  further manifest metrics, as dicts of `models.Metric` fields
    command, device, torch, python   how and where the run happened
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from training.nets import ModelSpec

CHECKPOINT_FILE = "checkpoint.pt"
KEYS = frozenset(
    {
        "task",
        "config",
        "arch",
        "model_class",
        "model_args",
        "state_dict",
        "curves",
        "duration_s",
        "dataset",
        "n_train",
        "baseline",
        "extra_metrics",
        "command",
        "device",
        "torch",
        "python",
    }
)


def save_checkpoint(version_dir: Path, ckpt: dict) -> Path:
    """Write `ckpt` (all of `KEYS`, nothing else) as `version_dir/checkpoint.pt`."""
    if set(ckpt) != KEYS:
        raise ValueError(f"checkpoint keys {sorted(ckpt)} differ from {sorted(KEYS)}")
    path = Path(version_dir) / CHECKPOINT_FILE
    torch.save(ckpt, path)
    return path


def load_checkpoint(version_dir: Path) -> dict:
    path = Path(version_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: export needs the checkpoint a training run writes there")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if missing := KEYS - set(ckpt):
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))}: not a checkpoint of this format")
    return ckpt


def load_model(ckpt: dict) -> nn.Module:
    """The trained network, in evaluation mode on the CPU, rebuilt from the checkpoint alone."""
    model = ModelSpec(ckpt["model_class"], ckpt["model_args"]).build()
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
