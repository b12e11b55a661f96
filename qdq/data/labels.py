"""Class labels for evaluation data: from a ``.npy``/text file, or parsed from image file names."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from qdq.data.images import IMAGE_SUFFIXES, list_files
from qdq.errors import DataError

__all__ = ["image_labels", "labels_from_file"]

logger = logging.getLogger(__name__)


def labels_from_file(path: str | Path) -> np.ndarray:
    """Integer class labels, one per sample in data order, from a 1-D ``.npy`` or a text file.

    A text file holds one integer per line; blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}; pass a .npy of ints or a text file with one int per line")
    if path.suffix.lower() == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read labels {path} ({exc}); re-save it with numpy.save") from exc
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"labels {path} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        return labels.astype(np.int64)
    values: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                values.append(int(text))
            except ValueError:
                raise DataError(f"labels {path} line {lineno}: {text[:40]!r} is not an integer; "
                                "write one integer label per line") from None
    if not values:
        raise DataError(f"labels file {path} is empty; write one integer label per line")
    return np.asarray(values, dtype=np.int64)


#: Leading class index in an image file name, e.g. ``0042_n01234567_name.jpg`` (the ImageNet sample layout).
_LABEL_IN_NAME = re.compile(r"^(\d+)_")


def image_labels(folder: str | Path, num_samples: int | None = None) -> np.ndarray | None:
    """Labels parsed from image file names ``<int>_...`` in the order :func:`open_data` reads them.

    Returns None when the folder has no images or any name lacks the leading ``<int>_``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = list_files(folder, IMAGE_SUFFIXES)[:num_samples]
    matches = [_LABEL_IN_NAME.match(p.name) for p in files]
    if not files or not all(matches):
        return None
    return np.asarray([int(m.group(1)) for m in matches if m], dtype=np.int64)
