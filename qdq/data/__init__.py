"""Calibration and evaluation data, streamed from disk in batches.

:func:`open_data` accepts

* a ``.npy`` file (single-input models; the first axis is the sample axis),
* a ``.npz`` file with one array per model input name (an input without a batch axis, such as a scalar or a
  fixed ``pads`` vector, holds its one value, or one equal copy per sample),
* a folder of ``.npy``/``.npz`` files (each file one sample or a batch of samples, name order),
* a folder of images (``.jpg``/``.jpeg``/``.png``, name order), resized on the short side,
  center-cropped, scaled to ``x/255`` and normalised with ``(x - mean) / std`` into NCHW.

Nothing is loaded up front (:mod:`qdq.data.arrays`: memory maps and sequential decompression;
images are decoded one by one), so memory is bounded by one batch, whatever the number of
samples. Opened with the model's signature (:func:`qdq.model_inputs.model_inputs`), files are
checked against the model when opened and batches come in the model's dtypes.

Problems are raised as one-line :class:`~qdq.errors.DataError` messages naming the fix: a missing
path, no samples, an ``.npz`` without an array for a model input, arrays whose dtype, rank or dims
do not match the model input, or NaN/Inf values (checked on every batch as it is read).

Modules: :mod:`~qdq.data.arrays` (on-disk arrays), :mod:`~qdq.data.images` (image decoding),
:mod:`~qdq.data.labels` (class labels), :mod:`~qdq.data.source` (the DataSource).
"""

from __future__ import annotations

from qdq.data.images import IMAGE_SUFFIXES, InputShape, load_image
from qdq.data.labels import image_labels, labels_from_file
from qdq.data.source import DataSource, open_data

__all__ = [
    "IMAGE_SUFFIXES",
    "DataSource",
    "InputShape",
    "image_labels",
    "labels_from_file",
    "load_image",
    "open_data",
]
