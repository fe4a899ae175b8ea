"""The three data sets, held whole in memory as tensors and batched by indexing.

Images stay uint8 (N, C, H, W) until a batch is drawn: scaling, augmentation and normalization then run
on the whole batch on the training device, which is what makes an epoch take seconds rather than minutes
of per-sample PIL conversions.
"""

from __future__ import annotations

import csv
import io
import itertools
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training.config import ClassifierConfig, SequenceConfig

MNIST_LABELS = tuple(str(d) for d in range(10))
# CIFAR-10's own class order: torchvision's CIFAR10 and the image-folder subset both map to it.
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_SUBSET = "cifar10-subset"
CIFAR_BATCHES = "cifar-10-batches-py"
WEATHER_CSV = Path("timeseries") / "seattle-weather-daily.csv"
_MNIST_FILES = tuple(
    f"{split}-{kind}" for split in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
)


class DataError(RuntimeError):
    """A data directory does not hold what a task expects; the message says what, and where."""


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, C, H, W) with int64 labels, the same layout whatever the source."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))

    def head(self, n: int | None) -> ImageSet:
        """The first `n` items (all when None), e.g. for a quick run on a few thousand images."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], self.labels[:n])


def load_mnist(data_dir: Path) -> tuple[ImageSet, ImageSet]:
    """MNIST train and test through torchvision: read from `<data_dir>/MNIST/raw/`, downloaded there if absent."""
    from torchvision.datasets import MNIST

    raw = Path(data_dir) / "MNIST" / "raw"
    download = not all((raw / f).is_file() for f in _MNIST_FILES)
    expected = f"{raw}/{{{','.join(_MNIST_FILES)}}} (the uncompressed IDX files)"
    try:
        sets = [MNIST(str(data_dir), train=train, download=download) for train in (True, False)]
    except Exception as e:  # torchvision raises anything from URLError to a bare RuntimeError here
        action = "could not download it there" if download else "could not read it"
        raise DataError(f"no usable MNIST: expected {expected}; {action}: {e}") from e
    out = []
    for ds, split in zip(sets, ("train", "test"), strict=True):
        images, labels = ds.data, ds.targets
        if images.dtype != torch.uint8 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DataError(f"malformed MNIST {split} set under {raw}: images {tuple(images.shape)} {images.dtype}")
        out.append(ImageSet(images.unsqueeze(1).contiguous(), labels.long()))
    return out[0], out[1]


def load_cifar10(data_dir: Path) -> tuple[ImageSet, ImageSet, str]:
    """CIFAR-10 train and test, and the name of the data set they come from ("CIFAR-10" or "CIFAR-10 subset").

    `<data_dir>/cifar10-subset/` (image folders) wins; else `<data_dir>/cifar-10-batches-py/` through
    torchvision; else torchvision downloads the full set into `data_dir`.
    """
    data_dir = Path(data_dir)
    if (data_dir / CIFAR_SUBSET).is_dir():
        train = read_image_folder(data_dir / CIFAR_SUBSET / "train", CIFAR10_LABELS, "RGB")
        test = read_image_folder(data_dir / CIFAR_SUBSET / "test", CIFAR10_LABELS, "RGB")
        return train, test, "CIFAR-10 subset"
    from torchvision.datasets import CIFAR10

    download = not (data_dir / CIFAR_BATCHES).is_dir()
    try:
        sets = [CIFAR10(str(data_dir), train=train, download=download) for train in (True, False)]
    except Exception as e:  # as for MNIST: network and format errors alike
        raise DataError(
            f"no usable CIFAR-10 in {data_dir}: expected {data_dir / CIFAR_SUBSET}/{{train,test}}/<class>/*.png "
            f"or torchvision's {data_dir / CIFAR_BATCHES}/; "
            f"{'downloading it failed' if download else 'reading it failed'}: {e}"
        ) from e
    out = []
    for ds in sets:
        if tuple(ds.classes) != CIFAR10_LABELS:
            raise DataError(f"{data_dir / CIFAR_BATCHES}: classes {ds.classes} are not CIFAR-10's {CIFAR10_LABELS}")
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.long)))
    return out[0], out[1], "CIFAR-10"


def read_image_folder(root: Path, classes: tuple[str, ...], mode: str) -> ImageSet:
    """Read `root/<class>/*.png` as torchvision's ImageFolder orders it: by class, then by file name.

    The class index is the position in `classes`, not whatever folders happen to exist, so a folder set
    that lacks a class or has a stray one is an error rather than a silent relabelling.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is missing: expected an image folder {root}/<class>/*.png for {', '.join(classes)}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if found != sorted(classes):
        raise DataError(f"{root} holds class folders {found}; expected exactly {sorted(classes)}")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted((root / name).glob("*.png"))
        if not files:
            raise DataError(f"{root / name} holds no .png images")
        for f in files:
            try:
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert(mode)))
            except OSError as e:
                raise DataError(f"{f} is not a readable image: {e}") from e
            labels.append(index)
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise DataError(f"{root}: images differ in size ({sorted(shapes)[:3]}...); expected one size")
    stacked = torch.from_numpy(np.stack(images))
    stacked = stacked.unsqueeze(1) if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)
    return ImageSet(stacked.contiguous(), torch.tensor(labels, dtype=torch.long))


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


def on_paper(digit: np.ndarray, rng: np.random.Generator, size: int = 280, quality: int = 90) -> bytes:
    """An MNIST digit (uint8 28x28, light on dark) as people send one: drawn dark on white at a random scale and
    place in a size x size picture, saved as a JPEG.

    The 28x28 frame is scaled (bicubic) to 30% to 95% of the picture's side, so the 20-pixel digit spans 21% to
    68% of it (60 to 190 pixels of 280), and placed anywhere inside; `rng` makes the set reproducible.
    """
    side = round(size * rng.uniform(0.3, 0.95))
    drawn = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC)
    paper = Image.new("L", (size, size), 255)
    left, top = (int(v) for v in rng.integers(0, size - side + 1, 2))
    paper.paste(drawn, (left, top))
    buffer = io.BytesIO()
    paper.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def to_input(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 pixels to the network's input: /255, then (x - mean) / std, on the training device.

    Serving (`models.preprocessing.normalize`) folds the same arithmetic into one multiply-add; the two
    differ by float32 rounding only (tests hold them within 1e-6 on the real test images).
    """
    x = images.float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(images: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Random translation (zero-pad by `pad`, crop back at a random offset) and horizontal flips, per image.

    Runs on whole uint8 batches where they live, so augmentation costs a few kernels instead of a CPU loop.
    """
    n, c, h, w = images.shape
    device = images.device
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=device)
        rows = (dy + torch.arange(h, device=device)).view(n, 1, h, 1)
        cols = (dx + torch.arange(w, device=device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=device).view(n, 1, 1, 1)
        channel = torch.arange(c, device=device).view(1, c, 1, 1)
        images = padded[batch, channel, rows, cols]
    if flip:
        mirrored = torch.rand(n, device=device) < 0.5
        images = torch.where(mirrored.view(n, 1, 1, 1), images.flip(3), images)
    return images


@dataclass(frozen=True)
class DailySeries:
    """One daily series: consecutive dates and their float32 values."""

    dates: list[date]
    values: np.ndarray
    description: str

    def index_of(self, day: date) -> int:
        try:
            return self.dates.index(day)
        except ValueError:
            raise DataError(f"{self.description} has no {day.isoformat()}") from None


# The series is small (48 KB) and public domain (NOAA): a copy ships with the package (see weather/README.md), so
# `sequence` trains offline and on a fresh data volume.
BUNDLED_WEATHER_CSV = Path(__file__).parent / "weather" / "seattle-weather-daily.csv"


def weather_csv(data_dir: Path) -> Path:
    """`<data_dir>/timeseries/seattle-weather-daily.csv` when it exists, else the copy shipped with the package."""
    path = Path(data_dir) / WEATHER_CSV
    return path if path.is_file() else BUNDLED_WEATHER_CSV


def load_weather(data_dir: Path, column: str = "temp_max") -> DailySeries:
    """One column of the Seattle daily weather CSV (`weather_csv(data_dir)`)."""
    path = weather_csv(data_dir)
    if not path.is_file():
        raise DataError(f"{path} is missing: expected a CSV with columns date,{column},... (one row per day)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0] or "date" not in rows[0]:
        raise DataError(f"{path}: expected columns 'date' and {column!r}; found {list(rows[0]) if rows else 'no rows'}")
    try:
        dates = [date.fromisoformat(r["date"].replace("/", "-")) for r in rows]
        values = np.array([float(r[column]) for r in rows], dtype=np.float32)
    except ValueError as e:
        raise DataError(f"{path}: unreadable row: {e}") from e
    if any((b - a).days != 1 for a, b in itertools.pairwise(dates)):
        raise DataError(f"{path}: dates must be consecutive days, oldest first")
    if not np.isfinite(values).all():
        raise DataError(f"{path}: column {column!r} holds missing or non-finite values")
    return DailySeries(dates, values, f"Seattle daily {column}")


def windows(values: np.ndarray, origins: np.ndarray, history: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Histories ending at each origin (inclusive) and the `horizon` values after it: [N, history], [N, horizon]."""
    hist = origins[:, None] + np.arange(-history + 1, 1)
    future = origins[:, None] + np.arange(1, horizon + 1)
    if hist.min() < 0 or future.max() >= len(values):
        raise ValueError("a window reaches outside the series")
    return values[hist], values[future]


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
