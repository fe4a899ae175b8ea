"""The manifest's image preprocessing up to the model's uint8 pixels, shared by everything that feeds a model."""

from __future__ import annotations

import numpy as np
from PIL import Image

from models.manifest import ImagePreprocessing


def to_pixels(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    """`image` converted to the manifest's color mode and size (bilinear), as uint8 [C, H, W]."""
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)
    size = (spec.width, spec.height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
