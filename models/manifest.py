"""The manifest: everything serving needs to know about one model version.

Training writes it, the service reads it; it is the one contract between the two, so it lives here,
beside the artifacts it describes, and imports neither torch nor anything of theirs.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output tensor of the exported graph; string dimensions are dynamic."""

    name: str
    shape: list[int | str]
    dtype: Literal["float32"] = "float32"
    layout: str = Field(description="Axis names, e.g. NCHW for images, NT for a batch of series.")
    meaning: str = ""


class ImagePreprocessing(_Strict):
    """How any client image becomes the model's input: convert, fit to height x width, scale to [0, 1], normalize."""

    color_mode: Literal["L", "RGB"]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    mean: list[float]
    std: list[float]
    fit: Literal["resize", "mnist"] = Field(
        default="resize",
        description="How a picture of any size is fitted to height x width. `resize`: the whole picture is "
        "resized (bilinear), as for photos. `mnist`: the picture is put into MNIST's form, so that a digit drawn "
        "or photographed at any size, dark on light or light on dark, reads as the training digits do: light ink "
        "on a dark background (a light background, read from the border, is inverted; the paper's level and grain "
        "are subtracted), cropped to the ink, its longer side scaled to 20 pixels keeping the aspect (Lanczos, "
        "antialiased), placed in 28x28 with its centre of mass at (14, 14). Needs color_mode L and 28x28; an "
        "MNIST digit passes through unchanged.",
    )

    @model_validator(mode="after")
    def _one_stat_per_channel(self) -> ImagePreprocessing:
        channels = 1 if self.color_mode == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values for color mode {self.color_mode}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.fit == "mnist" and (self.color_mode, self.height, self.width) != ("L", 28, 28):
            raise ValueError("fit 'mnist' makes 28x28 greyscale digits: it needs color_mode L, height and width 28")
        return self


class SeriesSpec(_Strict):
    """A forecaster's contract: histories of min..max values in, the next `horizon` values out."""

    min_history: int = Field(gt=0)
    max_history: int = Field(gt=0)
    horizon: int = Field(gt=0)
    target: str = Field(description="What the series measures, with its unit.")

    @model_validator(mode="after")
    def _ordered(self) -> SeriesSpec:
        if self.max_history < self.min_history:
            raise ValueError("max_history must be >= min_history")
        return self


class Metric(_Strict):
    """One measured figure, with the data it was measured on."""

    name: str
    value: float
    dataset: str
    split: str
    n_items: int = Field(gt=0)
    baseline: float | None = Field(default=None, description="The same metric for the reference baseline.")


class TrainingInfo(_Strict):
    command: str
    seed: int
    dataset: str
    n_train_items: int
    epochs: int
    device: str
    duration_s: float
    config: dict[str, object] = Field(default_factory=dict)


class Artifact(_Strict):
    file: str
    format: Literal["onnx", "torchscript"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)
    opset: int | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    version: str = Field(pattern=r"^[0-9]+$")
    task: Literal["classification", "forecast"]
    architecture: str
    description: str
    input: TensorSpec
    output: TensorSpec
    preprocessing: ImagePreprocessing | None = None
    series: SeriesSpec | None = None
    labels: list[str] | None = None
    metrics: list[Metric]
    training: TrainingInfo
    libraries: dict[str, str]
    created_at: datetime
    artifacts: dict[Literal["onnx", "torchscript"], Artifact]

    @model_validator(mode="after")
    def _task_fields(self) -> Manifest:
        if self.task == "classification":
            if self.preprocessing is None or not self.labels:
                raise ValueError("a classification manifest needs preprocessing and labels")
        elif self.series is None:
            raise ValueError("a forecast manifest needs a series spec")
        return self

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"model {self.name} v{self.version} has no metric {name!r}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
