"""The manifest's image preprocessing, computed: any picture in, the classifier's float32 input out.

One implementation for everyone who feeds a classifier (serving, export's checks, benchmarks, tests), so
the figures a manifest records are computed exactly as requests are answered. numpy and Pillow only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from models.manifest import ImagePreprocessing


def to_pixels(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """uint8 [C, H, W]: convert to spec.color_mode, resize to (spec.width, spec.height) with BILINEAR if needed.

    A JPEG not yet decoded is decoded at the smallest of its 1/1, 1/2, 1/4, 1/8 scales that is still at least the
    target size (Pillow's `draft`): a phone photo then costs a fraction of its full decode, for every caller alike.
    """
    image.draft(spec.color_mode, (spec.width, spec.height))
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)
    size = (spec.width, spec.height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def normalize(pixels: np.ndarray, spec: ImagePreprocessing) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 [N, C, H, W]: (x / 255 - mean) / std, folded into one multiply-add per channel."""
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    scale = 1.0 / (255.0 * std)
    shift = -np.asarray(spec.mean, dtype=np.float32)[None, :, None, None] / std
    return pixels.astype(np.float32) * scale + shift


def preprocess(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """float32 [C, H, W] = normalize(to_pixels(image, spec)[None], spec)[0]."""
    return normalize(to_pixels(image, spec)[None], spec)[0]
