"""Every knob of a training run, one dataclass per task.

A run is fully described by its config: the CLI only overrides fields, the checkpoint stores all of them,
and the manifest repeats them, so any model in the repository says how to train it again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "models"

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class RunConfig:
    """Knobs every task shares: the model's name in the repository, data and output folders, device, seed."""

    name: str = ""
    data_dir: Path = DEFAULT_DATA_DIR
    out: Path = DEFAULT_OUT
    version: str | None = None
    device: Device = "auto"
    seed: int = 0


@dataclass(frozen=True)
class ClassifierConfig(RunConfig):
    """An image classifier's recipe; `DigitsConfig` and `CifarConfig` give each task's defaults."""

    arch: str = ""
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["constant", "onecycle"] = "constant"
    label_smoothing: float = 0.0
    # Random translation: pad by `pad` pixels, crop back at a random offset; `flip` mirrors half the batch.
    pad: int = 0
    flip: bool = False
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    # Also train the seed network with the seed recipe and record its test accuracy as the baseline.
    baseline: bool = True
    eval_batch_size: int = 256
    # Cap on training images, for quick experiments and tests; None uses the whole training set.
    max_train_items: int | None = None

    seed_arch: str = field(default="", init=False)

    @property
    def is_seed(self) -> bool:
        return self.arch == self.seed_arch


# The recipe of the original scripts: SGD lr 0.01 momentum 0.9, batch 64, 10 epochs, inputs scaled to [-1, 1].
_SEED_RECIPE: dict[str, object] = dict(
    epochs=10,
    batch_size=64,
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0,
    schedule="constant",
    label_smoothing=0.0,
    pad=0,
    flip=False,
)


@dataclass(frozen=True)
class DigitsConfig(ClassifierConfig):
    """MNIST digits: `mlp` is the seed network and recipe, `cnn` (default) the strong one."""

    name: str = "digits"
    arch: Literal["mlp", "cnn"] = "cnn"
    seed_arch: str = field(default="mlp", init=False)

    @classmethod
    def recipe(cls, arch: str = "cnn", **overrides: object) -> DigitsConfig:
        if arch == "mlp":
            base = cls(arch="mlp", mean=(0.5,), std=(0.5,), **_SEED_RECIPE)  # type: ignore[arg-type]
        elif arch == "cnn":
            # Two conv blocks with batch norm train fast with Adam and a one-cycle schedule; shifts of up to
            # two pixels are the augmentation that matters for digits (no flips: a mirrored 2 is no digit).
            base = cls(
                arch="cnn",
                epochs=8,
                batch_size=128,
                optimizer="adamw",
                lr=3e-3,
                weight_decay=5e-4,
                schedule="onecycle",
                pad=2,
                mean=(0.1307,),
                std=(0.3081,),
            )
        else:
            raise ValueError(f"unknown digits architecture {arch!r}; choose mlp or cnn")
        return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CifarConfig(ClassifierConfig):
    """CIFAR-10: `cnn` is the seed network and recipe, `resnet` (default) the strong one."""

    name: str = "cifar"
    arch: Literal["cnn", "resnet"] = "resnet"
    seed_arch: str = field(default="cnn", init=False)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resnet_depth: int = 20
    resnet_width: int = 32

    @classmethod
    def recipe(cls, arch: str = "resnet", **overrides: object) -> CifarConfig:
        if arch == "cnn":
            base = cls(arch="cnn", **_SEED_RECIPE)  # type: ignore[arg-type]
        elif arch == "resnet":
            # Few images and many epochs: crop+flip augmentation, label smoothing and weight decay keep the
            # residual net from memorising the 5,170-image subset; statistics are CIFAR-10's own.
            base = cls(
                arch="resnet",
                epochs=120,
                batch_size=128,
                optimizer="sgd",
                lr=0.1,
                momentum=0.9,
                weight_decay=5e-4,
                schedule="onecycle",
                label_smoothing=0.1,
                pad=4,
                flip=True,
                mean=(0.4914, 0.4822, 0.4465),
                std=(0.2470, 0.2435, 0.2616),
            )
        else:
            raise ValueError(f"unknown cifar architecture {arch!r}; choose cnn or resnet")
        return replace(base, **overrides)  # type: ignore[arg-type]


Cell = Literal["rnn", "lstm", "gru"]
CELLS: tuple[Cell, ...] = ("rnn", "lstm", "gru")


@dataclass(frozen=True)
class SequenceConfig(RunConfig):
    """Daily temp_max forecaster: variable-length history in, the next `horizon` days out.

    `cell="all"` trains one forecaster per recurrent cell and keeps the one with the lowest validation RMSE.
    """

    name: str = "sequence"
    cell: Literal["rnn", "lstm", "gru", "all"] = "all"
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.0  # between recurrent layers, when layers > 1
    horizon: int = 7
    min_history: int = 14
    max_history: int = 365
    # History length of every window the held-out RMSE is measured on.
    eval_history: int = 365
    column: str = "temp_max"
    unit: str = "degrees C"
    train_years: tuple[int, int] = (2012, 2014)
    # The last `val_days` of the training years only validate (model selection); 2015 is the test year.
    val_days: int = 61
    test_year: int = 2015
    # About 1,000 training days are memorised quickly: a short schedule and strong weight decay scored
    # best on validation among the recipes tried, for every cell.
    epochs: int = 8
    steps_per_epoch: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    grad_clip: float = 1.0

    @property
    def cells(self) -> tuple[Cell, ...]:
        return CELLS if self.cell == "all" else (self.cell,)


CONFIGS: dict[str, type[RunConfig]] = {"digits": DigitsConfig, "cifar": CifarConfig, "sequence": SequenceConfig}
# Fields that say where a run's output goes, not how the model was trained: kept out of the manifest.
_OUTPUT_FIELDS = {"out", "version"}


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
