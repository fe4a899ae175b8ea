"""The manifest's image preprocessing, computed: any picture in, the classifier's float32 input out.

One implementation for everyone who feeds a classifier (serving, export's checks, benchmarks, tests), so
the figures a manifest records are computed exactly as requests are answered. numpy and Pillow only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from models.manifest import ImagePreprocessing

# MNIST's form, as its test digits measure: the ink's bounding box is 20 pixels on its longer side (all 10,000,
# even counting only pixels above 64), and the centre of mass lies at 14.0 +- 0.29 pixels from the top-left
# pixel's centre on both axes, i.e. at (14, 14) up to a whole-pixel shift.
MNIST_FRAME = 28
MNIST_BOX = 20
MNIST_CENTRE = 14.0
# A pixel counts toward the bounding box when it stands out from the paper by this share of the ink's full
# strength, so JPEG ripples and shading do not stretch the box. At 25% every MNIST digit keeps its 20-pixel
# longer side, but 42% lose a faint column on the shorter side (1% already at 4 of 255): the fit therefore keeps
# this many pixels (of the 28x28 frame) around the box, so that an MNIST digit comes out unchanged.
INK_SHARE = 0.25
FRINGE = 2
# Ink weaker than this (of 255) is stretched to full strength, as a photo's grey-on-paper digit needs; MNIST's ink
# peaks at 254 or 255 and is left as it is.
FULL_STRENGTH = 230
# Below this contrast (of 255) between ink and paper, grain aside, a picture is blank: a shadow, a smudge.
MIN_CONTRAST = 32
# A JPEG is decoded at the smallest 1/1..1/8 scale that keeps this many pixels a side, for speed: a 280x280 JPEG
# at half size, decoded and fitted in 205 us instead of 280. The digit keeps enough pixels for its 20-pixel box
# when it spans a sixth of the picture or more; smaller ones lose a little: 2,000 test digits redrawn in 500x500
# JPEGs at 7-14% of the side are decoded at 9-18 pixels and 99.2% read right (99.55% at twice this size).
MNIST_DRAFT = 4 * MNIST_FRAME


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


class _Paper(NamedTuple):
    """What is not ink: the background's level, its grain, and which way the ink departs from it."""

    level: int
    grain: int
    light: bool  # dark ink on light paper
    strength: int  # the strongest ink's distance from the paper, grain excluded


def mnist_digit(image: Image.Image) -> np.ndarray:
    """uint8 [28, 28]: a picture of one digit, drawn or photographed, in MNIST's form.

    Greyscale; the paper is the median of the border pixels, inverted when it is nearer the picture's light end
    than its dark end, so the ink is light on dark; the paper's level and grain are subtracted (and weak ink
    stretched to full strength); the ink's bounding box is scaled so that its longer side is 20 pixels, keeping
    the aspect (Lanczos, antialiased), with a 2-pixel fringe around it; that is placed in 28x28 with its centre of
    mass at (14, 14) to the nearest pixel, the box shifted back inside the frame where needed and the fringe clipped
    to it. A picture without ink gives a blank frame; an MNIST digit comes back unchanged.
    """
    image.draft("L", (MNIST_DRAFT, MNIST_DRAFT))
    grey = np.asarray(_greyscale(image), dtype=np.uint8)
    digit = np.zeros((MNIST_FRAME, MNIST_FRAME), dtype=np.uint8)
    paper = _paper(grey)
    if paper is None:
        return digit
    top, left, height, width = _ink_box(grey, paper)
    scale = MNIST_BOX / max(height, width)
    box_w, box_h = max(1, round(width * scale)), max(1, round(height * scale))
    scale_x, scale_y = box_w / width, box_h / height
    margin = math.ceil(FRINGE / min(scale_x, scale_y))  # the fringe, in the picture's pixels
    ink = _ink(grey, paper, top - margin, left - margin, height + 2 * margin, width + 2 * margin)
    size = (box_w + 2 * FRINGE, box_h + 2 * FRINGE)
    if scale_x == scale_y == 1:
        small = ink[margin - FRINGE : margin - FRINGE + size[1], margin - FRINGE : margin - FRINGE + size[0]]
    else:
        source = (
            margin - FRINGE / scale_x,
            margin - FRINGE / scale_y,
            margin + width + FRINGE / scale_x,
            margin + height + FRINGE / scale_y,
        )
        # Lanczos after an integer box reduction to within 2x of the target: from 84 pixels 29 us instead of 49, at
        # the same accuracy on the 10,000 redrawn test digits (within 0.01%).
        resized = Image.fromarray(ink).resize(size, Image.Resampling.LANCZOS, box=source, reducing_gap=2.0)
        small = np.asarray(resized, dtype=np.uint8)
    rows = small.sum(axis=1, dtype=np.float64)
    mass = rows.sum()
    if mass == 0:
        return digit
    centre_y = float(rows @ np.arange(size[1])) / mass
    centre_x = float(small.sum(axis=0, dtype=np.float64) @ np.arange(size[0])) / mass
    # The box (inside the fringe) stays whole in the frame; the fringe may be cut.
    y = min(max(round(MNIST_CENTRE - centre_y), -FRINGE), MNIST_FRAME - FRINGE - box_h)
    x = min(max(round(MNIST_CENTRE - centre_x), -FRINGE), MNIST_FRAME - FRINGE - box_w)
    frame_rows = slice(max(y, 0), min(y + size[1], MNIST_FRAME))
    frame_cols = slice(max(x, 0), min(x + size[0], MNIST_FRAME))
    digit[frame_rows, frame_cols] = small[
        frame_rows.start - y : frame_rows.stop - y, frame_cols.start - x : frame_cols.stop - x
    ]
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


def _paper(grey: np.ndarray) -> _Paper | None:
    """The paper, read from the picture's border; None when nothing on it stands out enough to be ink."""
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    middle = len(border) // 2
    level = int(np.partition(border, middle)[middle])  # the median, a third of np.median's cost
    darkest, lightest = int(grey.min()), int(grey.max())
    light = level - darkest > lightest - level
    strength = level - darkest if light else lightest - level
    # The grain (camera noise, JPEG's ripples): 90% of the border lies this close to the paper's level. It is
    # subtracted with the level, so the paper becomes MNIST's flat 0; capped, as a digit may touch the border.
    spread = np.abs(border.astype(np.int16) - level)
    tenth = len(spread) * 9 // 10
    grain = min(int(np.partition(spread, tenth)[tenth]), strength // 8)
    if strength - grain < MIN_CONTRAST:
        return None
    return _Paper(level, grain, light, strength - grain)


def _ink_box(grey: np.ndarray, paper: _Paper) -> tuple[int, int, int, int]:
    """Top, left, height, width of the pixels that stand out from the paper by INK_SHARE of the ink's strength."""
    limit = paper.grain + math.ceil(INK_SHARE * paper.strength)  # an int: uint8 compares without a float copy
    mask = grey < paper.level - limit if paper.light else grey > paper.level + limit
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def _ink(grey: np.ndarray, paper: _Paper, top: int, left: int, height: int, width: int) -> np.ndarray:
    """uint8 [height, width]: the ink, light on dark at full strength, in that window; 0 beyond the picture."""
    window = np.full((height, width), paper.level, dtype=np.int32)
    rows = slice(max(top, 0), min(top + height, grey.shape[0]))
    cols = slice(max(left, 0), min(left + width, grey.shape[1]))
    window[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = grey[rows, cols]
    ink = np.maximum((paper.level - window if paper.light else window - paper.level) - paper.grain, 0)
    if paper.strength < FULL_STRENGTH:
        ink = np.minimum((ink * 255 + paper.strength // 2) // paper.strength, 255)
    return ink.astype(np.uint8)


def normalize(pixels: np.ndarray, spec: ImagePreprocessing) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 [N, C, H, W]: (x / 255 - mean) / std, folded into one multiply-add per channel."""
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    scale = 1.0 / (255.0 * std)
    shift = -np.asarray(spec.mean, dtype=np.float32)[None, :, None, None] / std
    return pixels.astype(np.float32) * scale + shift


def preprocess(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """float32 [C, H, W] = normalize(to_pixels(image, spec)[None], spec)[0]."""
    return normalize(to_pixels(image, spec)[None], spec)[0]
