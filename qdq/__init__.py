"""qdq: ONNX-centric quantization — config → QDQ rewrite → calibration in onnxruntime → finalize.

The API follows Apple's coreai_opt (``QuantizerConfig``, ``ModuleQuantizerConfig``,
``QuantizationSpec``, ``Quantizer.prepare`` / ``calibration_mode`` / ``finalize``).
"""

from __future__ import annotations

from typing import Any

from qdq.backends import ExportBackend
from qdq.calibration import QParamsCalculatorBase, RangeCalculatorBase  # loads the built-in calculators
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


def _installed_version() -> str:
    """The installed distribution's version (pyproject.toml is the one source); the source tree's if not installed."""
    from importlib import metadata

    try:
        return metadata.version("qdq")
    except metadata.PackageNotFoundError:
        return "0.1.0+source"


__version__ = _installed_version()

__all__ = [
    "PRESETS",
    "BackendError",
    "ConfigError",
    "DataError",
    "ExportBackend",
    "ModelError",
    "ModuleQuantizerConfig",
    "PerBlockGranularity",
    "PerChannelGranularity",
    "PerTensorGranularity",
    "PreparedModel",
    "QDType",
    "QParamsCalculatorBase",
    "QScheme",
    "QdqError",
    "QuantizationSpec",
    "Quantizer",
    "QuantizerConfig",
    "RangeCalculatorBase",
    "__version__",
    "compare",
    "export",
    "finalize_model",
    "load_model",
    "preset",
    "quantize",
    "save",
]


def export(model: Any, args: tuple, path: Any, **kwargs: Any) -> Any:
    """PyTorch → ONNX with the dynamo exporter (see :func:`qdq.torch_export.export`); needs torch."""
    from qdq.torch_export import export as _export

    return _export(model, args, path, **kwargs)


def compare(fp32_model: Any, quant_model: Any, data: Any, **kwargs: Any) -> Any:
    """FP32 vs quantized in onnxruntime (see :func:`qdq.validate.compare`)."""
    from qdq.validate import compare as _compare

    return _compare(fp32_model, quant_model, data, **kwargs)
