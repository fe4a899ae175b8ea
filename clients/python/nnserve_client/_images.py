"""Turn whatever a caller holds (path, bytes, PIL image, numpy array) into encoded image bytes."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

ImageInput: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
"""One image: a file path, already-encoded bytes, a PIL image, or an H x W / H x W x C array (C in 1, 3, 4) of
uint8 or integers in 0..255, or of floats in [0, 1]."""

_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


def is_single_image(obj: object) -> bool:
    """True for one image; False for a collection (a list, a tuple, an N x H x W x C or N x H x W array).

    A 3-D array is one H x W x C image when its last axis can be channels (1, 3 or 4), else N grayscale
    H x W images: MNIST's natural (N, 28, 28). A batch of images 1, 3 or 4 pixels wide needs a list instead.
    """
    if isinstance(obj, np.ndarray):
        return obj.ndim == 2 or (obj.ndim == 3 and obj.shape[2] in (1, 3, 4))
    return isinstance(obj, str | os.PathLike | bytes | bytearray | memoryview | Image.Image)


def as_image_list(images: ImageInput | Iterable[ImageInput]) -> tuple[list[ImageInput], bool]:
    """The images as a list, and whether the caller passed a single one (so gets a single result back)."""
    if is_single_image(images):
        return [images], True  # type: ignore[list-item]
    return list(images), False  # type: ignore[arg-type]


def encode_image(image: ImageInput) -> bytes:
    """Encoded bytes for one image. Files and bytes go as they are; pixels become PNG (lossless, small)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if isinstance(image, Image.Image):
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buf = io.BytesIO()
        # Level 1: the server decodes at once, so encoding speed matters more than a few bytes.
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise TypeError(f"not an image: {type(image).__name__} (use a path, bytes, a PIL image or a numpy array)")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    array = _as_uint8(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(f"image arrays must be H x W or H x W x C with C in 1, 3, 4; got shape {array.shape}")


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels from uint8, from integers in 0..255, or from floats in [0, 1] (what ToTensor-style code holds)."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError("float image arrays must hold values in [0, 1]; for 0..255 values use .astype(np.uint8)")
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("integer image arrays must hold values in 0..255")
        return array.astype(np.uint8)
    raise ValueError(f"image arrays must be uint8, integers in 0..255 or floats in [0, 1]; got {array.dtype}")


def content_type(data: bytes) -> str:
    """The media type of encoded image bytes, from their magic number; the server decodes any of them."""
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    return "application/octet-stream"
