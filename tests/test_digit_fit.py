"""The digits model's MNIST fit (`models.preprocessing.mnist_digit`): pictures as people draw or photograph digits
are put into MNIST's form, MNIST's own digits are left as they are, and the served model reads them right."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

import models
from bench.payloads import read_idx
from models import ImagePreprocessing, to_pixels
from models.preprocessing import mnist_digit
from tests.data import data_dir, mnist_test
from tests.serving import RunningServer
from training.data import on_paper
from training.export import as_pictures, drawn_digit_metrics, onnx_predictions, ort_session

DIGITS = models.load(models.DEFAULT_ROOT, "digits")
SPEC = DIGITS.manifest.preprocessing
assert SPEC is not None
N_ACCURACY = 500


def ink_box(digit: np.ndarray, level: int = 128) -> tuple[int, int, int, int]:
    """Top, left, height, width of the pixels above `level`."""
    rows, cols = np.flatnonzero((digit > level).any(axis=1)), np.flatnonzero((digit > level).any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    mass = digit.astype(np.float64)
    return float(mass.sum(axis=1) @ np.arange(28) / mass.sum()), float(mass.sum(axis=0) @ np.arange(28) / mass.sum())


def paper(width: int, height: int, rects: list[tuple[int, int, int, int]], ink: int = 0, bg: int = 255) -> Image.Image:
    """A greyscale picture of `bg` with filled rectangles (left, top, right, bottom) of `ink`."""
    pixels = np.full((height, width), bg, dtype=np.uint8)
    for left, top, right, bottom in rects:
        pixels[top:bottom, left:right] = ink
    return Image.fromarray(pixels)


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_the_bundled_digits_model_declares_the_fit_and_old_manifests_mean_resize() -> None:
    assert SPEC.fit == "mnist"
    cifar = models.load(models.DEFAULT_ROOT, "cifar")
    assert '"fit"' not in (cifar.path / models.MANIFEST_FILE).read_text()
    assert cifar.manifest.preprocessing is not None and cifar.manifest.preprocessing.fit == "resize"
    with pytest.raises(ValidationError, match="fit 'mnist' makes 28x28 greyscale digits"):
        ImagePreprocessing(color_mode="RGB", height=28, width=28, mean=[0.5] * 3, std=[0.5] * 3, fit="mnist")
    with pytest.raises(ValidationError, match="fit 'mnist' makes 28x28 greyscale digits"):
        ImagePreprocessing(color_mode="L", height=32, width=32, mean=[0.5], std=[0.5], fit="mnist")


def test_the_fit_leaves_mnist_digits_as_they_are() -> None:
    """Training feeds MNIST digits unfitted; serving fits every picture. Of all 70,000 MNIST digits the fit changes
    0.6%: 291 lose a speck of ink beyond two pixels of the digit, 105 whose ends are fainter than a quarter of the
    ink are scaled up slightly. That is 0.03 of 255 per pixel on average (test: 43 digits changed, 0.028; train:
    353, 0.029)."""
    raw = data_dir() / "MNIST" / "raw"
    for name in ("t10k", "train"):
        digits = read_idx(raw / f"{name}-images-idx3-ubyte")
        fitted = np.stack([mnist_digit(Image.fromarray(d)) for d in digits])
        difference = np.abs(fitted.astype(np.int16) - digits)
        changed = difference.reshape(len(digits), -1).max(axis=1) > 0
        print(f"{name}: {changed.sum()} of {len(digits)} digits changed, mean |difference| {difference.mean():.4f}")
        assert changed.mean() <= 0.01 and difference.mean() <= 0.05


def test_drawn_digits_are_classified_right() -> None:
    """Real test digits as they are, inverted, and redrawn large on paper as JPEGs, through ONNX Runtime."""
    digits, labels = mnist_test()
    digits, labels = digits[:N_ACCURACY], labels[:N_ACCURACY]
    session = ort_session(DIGITS.artifact_path("onnx"))
    plain = float((onnx_predictions(session, as_pictures(digits[:, None]), SPEC) == labels).mean())
    drawn = {m.name: m.value for m in drawn_digit_metrics(session, digits, labels, SPEC, "MNIST")}
    print(f"accuracy on {N_ACCURACY} test digits: as they are {plain:.4f}, {drawn}")
    assert plain >= 0.99 and drawn["accuracy_inverted"] >= 0.99 and drawn["accuracy_on_paper"] >= 0.99
    # What resizing alone makes of the same pictures: the digit is lost.
    resized = SPEC.model_copy(update={"fit": "resize"})
    before = {m.name: m.value for m in drawn_digit_metrics(session, digits[:100], labels[:100], resized, "MNIST")}
    assert before["accuracy_inverted"] < 0.5 and before["accuracy_on_paper"] < 0.5


def test_a_light_background_is_inverted_and_a_faint_one_subtracted() -> None:
    digits, _ = mnist_test()
    rng = np.random.default_rng(0)
    differences = []
    for digit in digits[:50]:
        assert np.array_equal(mnist_digit(Image.fromarray(255 - digit)), digit)
        noise = rng.normal(0, 2, digit.shape)  # camera noise
        pencil = np.clip(170 - 110 * (digit / 255) + noise, 0, 255)  # ink 60 on grey paper at 170
        chalk = np.clip(50 + 150 * (digit / 255) + noise, 0, 255)  # ink 200 on a board at 50: no inversion
        for picture in (pencil, chalk):
            fitted = mnist_digit(Image.fromarray(picture.astype(np.uint8))).astype(np.int16)
            assert (fitted[digit == 0] == 0).mean() >= 0.9  # the paper and its grain are gone
            # Noise may move the centre of mass across a pixel boundary: compare up to a one-pixel shift.
            shifts = [np.roll(fitted, (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            differences.append(min(float(np.abs(shifted - digit).mean()) for shifted in shifts))
    # Stretched back to full strength: within a few levels of 255 of the digit.
    assert np.mean(differences) <= 2.5 and np.max(differences) <= 5, differences


def test_the_background_comes_from_the_border_even_when_ink_covers_most_of_the_picture() -> None:
    block = mnist_digit(paper(40, 40, [(2, 2, 38, 38)]))  # a black square on white, 81% of the picture
    top, left, height, width = ink_box(block)
    assert (height, width) == (20, 20) and block[top + 1 : top + 19, left + 1 : left + 19].min() >= 250
    assert all(abs(c - 14) <= 0.5 for c in centre_of_mass(block))


@pytest.mark.parametrize(
    "picture",
    [
        Image.new("L", (280, 280), 255),
        Image.new("L", (280, 280), 0),
        Image.new("RGB", (50, 30), (128, 140, 120)),
        Image.new("RGBA", (280, 280), (0, 0, 0, 0)),
        paper(280, 280, [(100, 100, 180, 110)], ink=232),  # a mark of 23 levels: a shadow, no ink
        jpeg(Image.fromarray(np.clip(np.random.default_rng(1).normal(240, 3, (280, 280)), 0, 255).astype(np.uint8))),
    ],
    ids=["white", "black", "grey-rgb", "transparent", "faint-mark", "noisy-jpeg"],
)
def test_a_picture_without_ink_is_a_blank_frame(picture: Image.Image) -> None:
    pixels = to_pixels(picture, SPEC)
    assert pixels.shape == (1, 28, 28) and pixels.dtype == np.uint8 and not pixels.any()


@pytest.mark.parametrize(
    ("rects", "height", "width"),
    [
        ([(40, 120, 240, 160)], 4, 20),  # a dash, 200x40: 20x4
        ([(130, 20, 148, 260)], 20, 2),  # a stroke, 18x240: 2x20 (1.5, rounded)
        ([(50, 80, 200, 130)], 7, 20),  # 150x50: 20x6.7
    ],
    ids=["wide", "tall", "three-to-one"],
)
def test_a_non_square_crop_keeps_its_aspect_and_is_centred_by_mass(
    rects: list[tuple[int, int, int, int]], height: int, width: int
) -> None:
    digit = mnist_digit(jpeg(paper(280, 280, rects)))
    assert ink_box(digit, level=64)[2:] == (height, width)
    centre_y, centre_x = centre_of_mass(digit)
    assert abs(centre_y - 14) <= 0.5 and abs(centre_x - 14) <= 0.5


def test_a_lopsided_digit_is_shifted_back_into_the_frame_not_cut() -> None:
    """A thin bar with a heavy blob at its left end: centring the mass would push the bar's right end out."""
    digit = mnist_digit(paper(280, 280, [(40, 100, 240, 104), (40, 50, 100, 110)]))
    _, left, _, width = ink_box(digit, level=24)  # the bar, 0.4 pixels high, is faint
    assert width == 20 and left + width <= 28
    assert centre_of_mass(digit)[1] < 13  # off-centre, by as much as the frame demands


def test_a_drawing_on_a_transparent_canvas_reads_as_ink() -> None:
    digit = mnist_test()[0][7]
    for ink in (0, 255):  # black or white strokes; the transparent rest takes the contrasting colour
        rgba = np.zeros((28, 28, 4), dtype=np.uint8)
        rgba[..., :3], rgba[..., 3] = ink, digit
        assert np.array_equal(mnist_digit(Image.fromarray(rgba, "RGBA")), digit)


def test_a_large_photo_is_decoded_small_and_read_right() -> None:
    digits, labels = mnist_test()
    rng = np.random.default_rng(2)
    correct = 0
    for digit, label in zip(digits[:10], labels[:10], strict=True):
        photo = Image.open(io.BytesIO(on_paper(digit, rng, size=2400)))
        pixels = to_pixels(photo, SPEC)
        assert photo.size == (300, 300)  # JPEG draft: decoded at 1/8
        logits = ort_session(DIGITS.artifact_path("onnx")).run(
            ["output"], {"input": models.normalize(pixels[None], SPEC)}
        )
        correct += int(logits[0].argmax(1)[0] == label)
    assert correct >= 9


def test_the_server_reads_digits_drawn_large_as_jpegs(server: RunningServer) -> None:
    """100 real test digits, each a 280x280 dark-on-light JPEG, posted to the running service."""
    digits, labels = mnist_test()
    rng = np.random.default_rng(3)
    pictures = [on_paper(d, rng) for d in digits[1000:1100]]
    with httpx.Client(timeout=60) as client:
        files = [("files", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(pictures)]
        r = client.post(f"{server.url}/v1/digits/predict", files=files)
        assert r.status_code == 200, r.text
        predicted = [int(p["label"]) for p in r.json()["predictions"]]
        one = client.post(
            f"{server.url}/v1/digits/predict", content=pictures[0], headers={"Content-Type": "image/jpeg"}
        )
    assert one.status_code == 200, one.text
    assert int(one.json()["predictions"][0]["label"]) == predicted[0]  # one image per request, or many: the same
    correct = sum(p == label for p, label in zip(predicted, labels[1000:1100], strict=True))
    print(f"served: {correct} of 100 digits drawn large read right")
    assert len(predicted) == 100 and correct >= 95
