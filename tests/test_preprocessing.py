"""`models.preprocessing` against an independent float64 oracle and training's torch transform, on real images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import models
from models import ImagePreprocessing, normalize, preprocess, to_pixels
from tests.data import cifar_test_pngs, data_dir, mnist_test_pngs
from training.data import load_cifar10, load_mnist, to_input

DIGITS = models.load(models.DEFAULT_ROOT, "digits").manifest.preprocessing
CIFAR = models.load(models.DEFAULT_ROOT, "cifar").manifest.preprocessing
assert DIGITS is not None and DIGITS.fit == "mnist"
# The resize path, at the digits model's size and statistics (the MNIST fit has its own tests: test_digit_fit.py).
RESIZED_DIGITS = DIGITS.model_copy(update={"fit": "resize"})
N_MNIST = 2_000


def oracle(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """The manifest's words, spelled out in float64: Pillow converts and resizes, then channel by channel
    (x / 255 - mean) / std. Pillow's resize returns a copy when the size already matches."""
    image = image.convert(spec.color_mode).resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    hwc = np.atleast_3d(np.array(image, dtype=np.float64))
    return np.stack(
        [(hwc[:, :, c] / 255.0 - mean) / std for c, (mean, std) in enumerate(zip(spec.mean, spec.std, strict=True))]
    )


def decoded(pngs: list[tuple[bytes, int]]) -> list[Image.Image]:
    images = []
    for png, _ in pngs:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            images.append(image)
    return images


@pytest.fixture(scope="module")
def mnist_images() -> list[Image.Image]:
    return decoded(mnist_test_pngs(N_MNIST))


@pytest.fixture(scope="module")
def cifar_images() -> list[Image.Image]:
    return decoded(cifar_test_pngs())


@pytest.mark.parametrize(
    ("images", "spec"),
    [
        ("mnist_images", RESIZED_DIGITS),
        # The MNIST fit leaves these 2,000 test digits as they are.
        ("mnist_images", DIGITS),
        ("cifar_images", CIFAR),
        # Another model's images: colour conversion and a bilinear resize both happen.
        ("cifar_images", RESIZED_DIGITS),
        ("mnist_images", CIFAR),
    ],
)
def test_preprocess_equals_the_oracle_on_real_images(images: str, spec: ImagePreprocessing, request) -> None:
    worst = 0.0
    for image in request.getfixturevalue(images):
        x = preprocess(image, spec)
        assert x.dtype == np.float32 and x.shape == (1 if spec.color_mode == "L" else 3, spec.height, spec.width)
        worst = max(worst, float(np.abs(x - oracle(image, spec)).max()))
    # float32 carries ~7 digits; inputs reach |x| ~ 3, so a few 1e-7 is rounding, anything above 1e-6 a bug.
    assert worst <= 1e-6, worst


def test_preprocess_is_to_pixels_then_normalize(cifar_images: list[Image.Image]) -> None:
    pixels = np.stack([to_pixels(image, CIFAR) for image in cifar_images[:64]])
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 3, 32, 32)
    batch = normalize(pixels, CIFAR)
    assert batch.dtype == np.float32 and batch.shape == pixels.shape
    assert np.array_equal(batch, np.stack([preprocess(image, CIFAR) for image in cifar_images[:64]]))


def test_to_pixels_takes_any_mode_and_size() -> None:
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    for spec in (RESIZED_DIGITS, CIFAR):
        pixels = to_pixels(rgba, spec)
        assert pixels.shape == (1 if spec.color_mode == "L" else 3, spec.height, spec.width)
        expected = np.asarray(rgba.convert(spec.color_mode).resize((spec.width, spec.height), Image.BILINEAR))
        assert np.array_equal(pixels, np.atleast_3d(expected).transpose(2, 0, 1))


@pytest.mark.parametrize("name", ["digits", "cifar"])
def test_training_transform_equals_preprocess(name: str) -> None:
    """What the networks were trained on is what serving feeds them, to float32 rounding.

    Training skips the digits' MNIST fit: MNIST digits are in that form already, and the fit leaves them (all of
    these, 99.4% of the 70,000 in all: test_digit_fit.py) unchanged."""
    if name == "digits":
        test = load_mnist(data_dir())[1].head(N_MNIST)
        spec = DIGITS
    else:
        test = load_cifar10(data_dir())[1]
        spec = CIFAR
    assert spec is not None
    trained_on = to_input(test.images, tuple(spec.mean), tuple(spec.std)).numpy()
    pixels = test.images.permute(0, 2, 3, 1).numpy()
    served = np.stack([preprocess(Image.fromarray(p.squeeze(2) if p.shape[2] == 1 else p), spec) for p in pixels])
    assert trained_on.shape == served.shape and trained_on.dtype == served.dtype == np.float32
    assert np.abs(trained_on - served).max() <= 1e-6
