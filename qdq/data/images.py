"""Image folders as model input: decode, resize on the short side, center-crop, ``(x/255 - mean) / std``, NCHW."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qdq.errors import ConfigError, DataError

__all__ = ["IMAGE_SUFFIXES", "ImageArray", "InputShape", "list_files", "load_image", "per_channel", "target_size"]

logger = logging.getLogger(__name__)

#: File suffixes (lower case) read as images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: A model input shape: ints for fixed dims, str/None for dynamic ones.
InputShape = Sequence[int | str | None]


def list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes), key=lambda p: p.name)


def per_channel(value: float | Sequence[float] | None, default: float, channels: int, what: str) -> np.ndarray:
    """``mean``/``std`` as a [C, 1, 1] float32 array (a scalar applies to every channel)."""
    arr = np.asarray(default if value is None else value, dtype=np.float32).reshape(-1)
    if arr.size not in (1, channels):
        raise ConfigError(f"{what} needs 1 or {channels} values (one per channel), got {arr.size}")
    if what == "std" and np.any(arr == 0):
        raise ConfigError("std must not contain 0 (it divides the pixel values)")
    return np.broadcast_to(arr, (channels,)).reshape(channels, 1, 1).copy()


def target_size(image_size: int | Sequence[int] | None, model_shape: InputShape | None, label: str) -> tuple[int, int]:
    """Target (height, width): from ``image_size`` or else the model input's fixed H and W."""
    if image_size is None:
        if model_shape is not None and len(model_shape) == 4:
            h, w = model_shape[2], model_shape[3]
            if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
                return h, w
        raise DataError(f"{label} is a folder of images but the model input size is not fixed; pass image_size "
                        "(e.g. --image-size 224)")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size[0], size[1]


class ImageArray:
    """One image file as a [1, C, H, W] float32 sample, decoded only when read."""

    def __init__(self, path: Path, size: tuple[int, int], mean: np.ndarray, std: np.ndarray) -> None:
        self.path, self.size, self.mean, self.std = path, size, mean, std
        self.shape: tuple[int, ...] = (1, mean.shape[0], *size)
        self.dtype: np.dtype = np.dtype(np.float32)

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.shape[1:]), np.float32)
        return load_image(self.path, self.size, self.mean, self.std)[None]


def load_image(path: Path, size: tuple[int, int], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Decode an image to a normalised float32 [C, H, W] array.

    Resizes (bicubic) so the image covers ``size`` with its aspect ratio kept, center-crops to
    ``size`` (the usual ImageNet evaluation transform), then applies ``(x/255 - mean) / std``.
    ``mean``/``std`` are [C, 1, 1]; C = 1 reads grayscale, otherwise RGB.
    """
    from PIL import Image, UnidentifiedImageError

    th, tw = size
    try:
        with Image.open(path) as src:
            img: Image.Image = src.convert("L" if mean.shape[0] == 1 else "RGB")
        w, h = img.size
        if (w, h) != (tw, th):
            scale = max(tw / w, th / h)
            nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - tw) // 2, (nh - th) // 2
            img = img.crop((left, top, left + tw, top + th))
        x = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); remove or replace the file") from exc
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
