"""The lowest ONNX opset that can express the quantization in use, and raising a model to it.

| feature                                   | opset |
|-------------------------------------------|-------|
| int8 / uint8, per-tensor or per-channel   | 13    |
| float8 e4m3fn / e5m2                      | 19    |
| int16 / uint16 / int4 / uint4, per-block  | 21    |
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_ir as ir

from qdq.errors import ModelError
from qdq.spec import QuantizationSpec

__all__ = ["required_opset", "ensure_opset", "MIN_IR_VERSION"]

logger = logging.getLogger(__name__)

#: IR version needed per opset (int4 and opset 21 need IR 10).
MIN_IR_VERSION = {13: 7, 19: 9, 21: 10}


def required_opset(specs: Iterable[QuantizationSpec]) -> int:
    """Lowest opset whose QuantizeLinear/DequantizeLinear support every spec's dtype."""
    need = 13
    for spec in specs:
        need = max(need, spec.dtype.min_opset)
    return need


def ensure_opset(model: ir.Model, opset: int, *, blocked: bool = False) -> None:
    """Raise the default-domain opset of ``model`` to at least ``opset`` (21 if blocked), converting ops."""
    if blocked:
        opset = max(opset, 21)
    current = model.opset_imports.get("", None)
    if current is None or current < opset:
        from onnxscript import version_converter

        try:
            version_converter.convert_version(model, target_version=opset)
        except Exception as exc:  # pragma: no cover - converter failures are model specific
            raise ModelError(
                f"could not convert the model from opset {current} to {opset} ({exc}); "
                f"re-export it at opset {opset} (qdq export --opset {opset})"
            ) from exc
        model.opset_imports[""] = opset
        logger.info("raised opset %s -> %d", current, opset)
    target_opset = model.opset_imports[""]
    need_ir = max(v for k, v in MIN_IR_VERSION.items() if k <= max(target_opset, 13))
    if model.ir_version < need_ir:
        model.ir_version = need_ir
