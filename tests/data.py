"""The real data sets, as tests use them: read with numpy and Pillow only, so tests need no torch for them.

`data_dir()` is `../shared/data` beside the repository unless NNSERVE_DATA_DIR names another folder.
"""

from __future__ import annotations

import csv
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from bench.payloads import png_bytes, read_idx

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def data_dir() -> Path:
    """Where the offline data sets live."""
    return Path(os.environ.get("NNSERVE_DATA_DIR") or Path(__file__).parents[1].parent / "shared" / "data")


@lru_cache(maxsize=1)
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test digits, uint8 [N, 28, 28], and their labels."""
    raw = data_dir() / "MNIST" / "raw"
    return read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte").astype(np.int64)


@lru_cache(maxsize=1)
def _mnist_pngs() -> tuple[bytes, ...]:
    images, _ = mnist_test()
    return tuple(png_bytes(image) for image in images)


def mnist_test_pngs(n: int) -> list[tuple[bytes, int]]:
    """The first `n` MNIST test digits as PNG files (bytes), with their labels: realistic client payloads."""
    _, labels = mnist_test()
    return [(png, int(label)) for png, label in zip(_mnist_pngs()[:n], labels[:n], strict=False)]


@lru_cache(maxsize=1)
def _cifar_test_files() -> tuple[tuple[Path, int], ...]:
    root = data_dir() / "cifar10-subset" / "test"
    files = [(f, index) for index, name in enumerate(CIFAR10_CLASSES) for f in sorted((root / name).glob("*.png"))]
    if not files:
        raise FileNotFoundError(f"no CIFAR-10 test images under {root}/<class>/*.png")
    return tuple(files)


def cifar_test_pngs() -> list[tuple[bytes, int]]:
    """The 517 CIFAR-10 subset test images as stored (PNG bytes) with their class index, class by class."""
    return [(f.read_bytes(), label) for f, label in _cifar_test_files()]


@lru_cache(maxsize=1)
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 subset test images decoded, uint8 [N, 32, 32, 3], and labels, in `cifar_test_pngs` order."""
    images = []
    for f, _ in _cifar_test_files():
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB")))
    return np.stack(images), np.array([label for _, label in _cifar_test_files()], dtype=np.int64)


@lru_cache(maxsize=1)
def weather(column: str = "temp_max") -> tuple[tuple[str, ...], np.ndarray]:
    """Dates (YYYY-MM-DD) and one column of the Seattle daily weather CSV, oldest first."""
    with open(data_dir() / "timeseries" / "seattle-weather-daily.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return tuple(r["date"].replace("/", "-") for r in rows), np.array([float(r[column]) for r in rows], np.float32)


def weather_2015() -> np.ndarray:
    """Seattle's daily temp_max (degrees C) through 2015, the forecaster's test year."""
    dates, values = weather()
    return values[[d.startswith("2015-") for d in dates]].copy()
