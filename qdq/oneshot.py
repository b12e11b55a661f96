"""``qdq.quantize``: config + calibration data in, finalized model out, in one call."""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

from qdq.backends import ExportBackend
from qdq.errors import DataError
from qdq.quantizer import Quantizer

__all__ = ["quantize"]

logger = logging.getLogger(__name__)


def quantize(model: Any, config: Any = None, calibration_data: Any = None, *,
             backend: Any = ExportBackend.ONNXRuntime, batch_size: int = 16, num_samples: int | None = None,
             progress: bool = True) -> ir.Model:
    """Quantize ``model`` (path / ModelProto / onnx_ir.Model) and finalize it for ``backend``.

    ``config``: QuantizerConfig, mapping, YAML path or preset name (default ``int8``).
    ``calibration_data``: a path understood by :func:`qdq.data.open_data`, a DataSource, or an
    iterable of batches (arrays, tuples or dicts by input name). Weight-only configs need none.
    """
    quantizer = Quantizer(model, config)
    quantizer.prepare()
    if any(t.observed for t in quantizer.targets.values()):
        if calibration_data is None:
            raise DataError("this config quantizes activations: pass calibration_data (e.g. --calib-data DIR)")
        batches, total = _batches(calibration_data, quantizer, batch_size, num_samples)
        quantizer.calibrate(batches, total=total, progress=progress)
    return quantizer.finalize(backend)


def _batches(data: Any, quantizer: Quantizer, batch_size: int, num_samples: int | None) -> tuple[Any, int | None]:
    from qdq.data import DataSource, open_data

    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        data = open_data(data, quantizer.input_names, num_samples=num_samples)
    if isinstance(data, DataSource):
        return data.batches(batch_size), -(-len(data) // batch_size)
    return data, (len(data) if hasattr(data, "__len__") else None)
