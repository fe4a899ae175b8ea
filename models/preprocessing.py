"""The manifest's image preprocessing, computed: any picture in, the classifier's float32 input out.

One implementation for everyone who feeds a classifier (serving, export's checks, benchmarks, tests), so
the figures a manifest records are computed exactly as requests are answered. numpy and Pillow only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from models.manifest import ImagePreprocessing

# MNIST's form, as its test digits measure: the ink's bounding box is 20 pixels on its longer side (all 10,000,
# even counting only pixels above 64), and the centre of mass lies at 14.0 +- 0.29 pixels from the top-left
# pixel's centre on both axes, i.e. at (14, 14) up to a whole-pixel shift.
MNIST_FRAME = 28
MNIST_BOX = 20
MNIST_CENTRE = 14.0
# A pixel counts toward the bounding box when it stands out from the background by this share of the ink's full
# strength, so JPEG ringing and a shaded background do not stretch the box. At 25% every MNIST digit keeps its
# 20-pixel longer side, but 42% lose a faint fringe column on the shorter side (1% already at 4 of 255): the crop
# therefore keeps this many pixels (of the 28x28 frame) around the box, and an MNIST digit comes out unchanged.
INK_SHARE = 0.25
FRINGE = 2
# Ink weaker than this (of 255) is stretched to full strength, as a photo's grey-on-paper digit needs; MNIST's ink
# peaks at 254 or 255 and is left as it is.
FULL_STRENGTH = 230
# Below this contrast (of 255) between ink and background a picture is blank: flat paper, JPEG noise.
MIN_CONTRAST = 32
# A JPEG is decoded at the smallest 1/1..1/8 scale that keeps this many pixels a side: the digit may fill only a
# part of the picture, and still needs a few pixels of its own per pixel of the 20-pixel box.
MNIST_DRAFT = 8 * MNIST_FRAME
MNIST_FILTER = Image.Resampling.LANCZOS


def to_pixels(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """uint8 [C, H, W]: the picture fitted to (spec.height, spec.width) as spec.fit says, in spec.color_mode.

    `resize`: convert to spec.color_mode and resize with BILINEAR if needed. `mnist`: see `mnist_digit`.
    A JPEG not yet decoded is decoded at the smallest of its 1/1, 1/2, 1/4, 1/8 scales that is still at least the
    size needed (Pillow's `draft`): a phone photo then costs a fraction of its full decode, for every caller alike.
    """
    if spec.fit == "mnist":
        return mnist_digit(image)[None]
    image.draft(spec.color_mode, (spec.width, spec.height))
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)
    size = (spec.width, spec.height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def mnist_digit(image: Image.Image) -> np.ndarray:
    """uint8 [28, 28]: a picture of one digit, drawn or photographed, in MNIST's form.

    Greyscale; the background is the median of the border pixels, and one nearer the picture's light end than its
    dark end is inverted, so the ink is light on dark; the background level is subtracted (and weak ink stretched
    to full strength); the ink's bounding box sets the scale, its longer side becoming 20 pixels (Lanczos,
    antialiased); the crop, with a 2-pixel fringe, is placed in 28x28 with its centre of mass at (14, 14) to the
    nearest pixel, shifted back inside the frame where needed. A picture without ink gives a blank frame.
    """
    image.draft("L", (MNIST_DRAFT, MNIST_DRAFT))
    grey = np.asarray(_greyscale(image), dtype=np.uint8)
    digit = np.zeros((MNIST_FRAME, MNIST_FRAME), dtype=np.uint8)
    found = _ink(grey)
    if found is None:
        return digit
    ink, longer = found
    scale = MNIST_BOX / longer
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    small = ink
    if size != (ink.shape[1], ink.shape[0]):
        small = np.asarray(Image.fromarray(ink).resize(size, MNIST_FILTER), dtype=np.uint8)
    rows = small.sum(axis=1, dtype=np.float64)
    mass = rows.sum()
    if mass == 0:
        return digit
    centre_y = float(rows @ np.arange(size[1])) / mass
    centre_x = float(small.sum(axis=0, dtype=np.float64) @ np.arange(size[0])) / mass
    top = min(max(round(MNIST_CENTRE - centre_y), 0), MNIST_FRAME - size[1])
    left = min(max(round(MNIST_CENTRE - centre_x), 0), MNIST_FRAME - size[0])
    digit[top : top + size[1], left : left + size[0]] = small
    return digit


def _greyscale(image: Image.Image) -> Image.Image:
    """Mode L. Transparent parts (a drawing on a transparent canvas) become the colour that contrasts the ink."""
    if image.mode == "L":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        la = image.convert("LA")
        alpha = np.asarray(la.getchannel("A"), dtype=np.float32) / 255
        luma = np.asarray(la.getchannel("L"), dtype=np.float32)
        if alpha.min() < 1:
            ink_luma = float((luma * alpha).sum() / max(alpha.sum(), 1e-6))
            paper = 0.0 if ink_luma > 127.5 else 255.0
            return Image.fromarray(np.rint(luma * alpha + paper * (1 - alpha)).astype(np.uint8))
        return la.getchannel("L")
    return image.convert("L")


def _ink(grey: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The ink, uint8 light on dark, cropped to its bounding box plus fringe, and the box's longer side in pixels;
    None when the picture holds no ink."""
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    background = int(np.partition(border, len(border) // 2)[len(border) // 2])  # the median, a third the cost
    darkest, lightest = int(grey.min()), int(grey.max())
    light_paper = background - darkest > lightest - background
    strength = background - darkest if light_paper else lightest - background
    if strength < MIN_CONTRAST:
        return None
    limit = INK_SHARE * strength
    mask = grey < background - limit if light_paper else grey > background + limit
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    longer = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    fringe = -(-FRINGE * longer // MNIST_BOX)  # FRINGE frame pixels, in the picture's pixels, rounded up
    top, left = max(rows[0] - fringe, 0), max(cols[0] - fringe, 0)
    crop = grey[top : rows[-1] + 1 + fringe, left : cols[-1] + 1 + fringe].astype(np.int32)
    ink = np.maximum(background - crop if light_paper else crop - background, 0)
    if strength < FULL_STRENGTH:
        ink = np.minimum((ink * 255 + strength // 2) // strength, 255)
    return ink.astype(np.uint8), int(longer)


def normalize(pixels: np.ndarray, spec: ImagePreprocessing) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 [N, C, H, W]: (x / 255 - mean) / std, folded into one multiply-add per channel."""
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    scale = 1.0 / (255.0 * std)
    shift = -np.asarray(spec.mean, dtype=np.float32)[None, :, None, None] / std
    return pixels.astype(np.float32) * scale + shift


def preprocess(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """float32 [C, H, W] = normalize(to_pixels(image, spec)[None], spec)[0]."""
    return normalize(to_pixels(image, spec)[None], spec)[0]
