"""qdq: ONNX-centric quantization — config → QDQ rewrite → calibration in onnxruntime → finalize.

The API follows Apple's coreai_opt (``QuantizerConfig``, ``ModuleQuantizerConfig``,
``QuantizationSpec``, ``Quantizer.prepare`` / ``calibration_mode`` / ``finalize``).
"""

from __future__ import annotations

from typing import Any

from qdq.backends import ExportBackend
from qdq.calibration.base import QParamsCalculatorBase, RangeCalculatorBase
from qdq.config import ModuleQuantizerConfig, QuantizerConfig
from qdq.dtypes import QDType
from qdq.errors import BackendError, ConfigError, DataError, ModelError, QdqError
from qdq.model_io import load_model, save
from qdq.oneshot import quantize
from qdq.presets import PRESETS, preset
from qdq.quantizer import PreparedModel, Quantizer, finalize_model
from qdq.spec import (
    PerBlockGranularity,
    PerChannelGranularity,
    PerTensorGranularity,
    QScheme,
    QuantizationSpec,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError", "ConfigError", "DataError", "ExportBackend", "ModelError", "ModuleQuantizerConfig",
    "PRESETS", "PerBlockGranularity", "PerChannelGranularity", "PerTensorGranularity", "PreparedModel",
    "QDType", "QParamsCalculatorBase", "QScheme", "QdqError", "QuantizationSpec", "Quantizer",
    "QuantizerConfig", "RangeCalculatorBase", "compare", "export", "finalize_model", "load_model", "preset",
    "quantize", "save",
]


def export(model: Any, args: tuple, path: Any, **kwargs: Any) -> Any:
    """PyTorch → ONNX with the dynamo exporter (see :func:`qdq.torch_export.export`); needs torch."""
    from qdq.torch_export import export as _export

    return _export(model, args, path, **kwargs)


def compare(fp32_model: Any, quant_model: Any, data: Any, **kwargs: Any) -> Any:
    """FP32 vs quantized in onnxruntime (see :func:`qdq.validate.compare`)."""
    from qdq.validate import compare as _compare

    return _compare(fp32_model, quant_model, data, **kwargs)
