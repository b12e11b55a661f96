"""The finalize pass list of each backend.

onnxruntime (CPU, ``ORT_ENABLE_ALL``), in order:

1. :class:`Fp8ActivationsAsCastsPass` - float8 activation pairs as Div -> Cast -> Cast -> Mul (its QDQ
   selectors would otherwise build a QLinearConv on float8, which fails to load).
2. :class:`ActivationsToUint8Pass` - int8 activations -> uint8 (zp + 128): the U8S8 layout its x86
   kernels fuse; no dequantized value changes.
3. :class:`FoldWeightsPass` - weights stored as quantized initializers -> DequantizeLinear.
   :class:`WeightsToUint8Pass` (``kernel_format="u8u8"``; ``"auto"``, the default, picks it on an x86 CPU
   without VNNI/AMX, whose U8S8 kernels saturate: :mod:`qdq.backends.host_cpu`) - int8 weights of integer
   kernels stored as uint8, zero point + 128; no dequantized value changes.
4. :class:`QuantizeBiasPass` - constant bias of 8-bit Conv / Gemm -> int32 -> DequantizeLinear.
   :class:`GatherThenDequantizePass` - embedding tables stay integer: rows gathered, then dequantized.
   :class:`MatMulIntegerToFloatPass` - an 8-bit QDQ MatMul with the bias Add / scalar Mul after it as one
   ``MatMulIntegerToFloat`` (onnxruntime's static fusion leaves them as float passes).
   :class:`KeepFloatWeightsPass` - a Conv/Gemm the config leaves float reads its own per-channel copy of its
   input DQ (same values), so onnxruntime's WeightBiasQuantization does not quantize its weight per tensor.
5. :class:`FoldActivationClipPass` - Relu / Clip before a Q dropped or moved onto the integers,
   so Conv meets its Q (exact).
6. :class:`StripMetadataPass` - qdq metadata kept on activation Q nodes only; exporter debug info dropped.

Core ML / Core AI have no ONNX passes: their converters read torch programs, built by
:func:`qdq.backends.artifact.finalize_for_backend` (legalize -> fold Relu/Clip -> lower).

:func:`finalize_pipeline` composes them in an ``onnx_ir.passes.PassManager``; :func:`run_finalize`
runs it on a model in place (what :func:`qdq.quantizer.finalize_model` does on a copy).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qdq.backends.capabilities import ExportBackend
from qdq.backends.host_cpu import kernel_format_for
from qdq.passes.activations_to_uint8 import ActivationsToUint8Pass
from qdq.passes.fold_activation_clip import FoldActivationClipPass
from qdq.passes.fold_weights import FoldWeightsPass
from qdq.passes.fp8_activations_as_casts import Fp8ActivationsAsCastsPass
from qdq.passes.gather_then_dequantize import GatherThenDequantizePass
from qdq.passes.keep_float_weights import KeepFloatWeightsPass
from qdq.passes.matmul_integer_to_float import MatMulIntegerToFloatPass
from qdq.passes.quantize_bias import QuantizeBiasPass
from qdq.passes.strip_metadata import StripMetadataPass
from qdq.passes.weights_to_uint8 import WeightsToUint8Pass

__all__ = ["finalize_passes", "finalize_pipeline", "run_finalize"]

logger = logging.getLogger(__name__)


def finalize_passes(backend: ExportBackend, kernel_format: str | None = None) -> list[ir.passes.InPlacePass]:
    """The in-place passes that legalize a prepared QDQ model for ``backend``, in order.

    ``kernel_format`` (onnxruntime): ``"u8s8"`` (int8 weights), ``"u8u8"`` (uint8 weights) or ``"auto"``/None
    (u8u8 where this CPU's U8S8 kernels saturate)."""
    fmt = kernel_format_for(backend, kernel_format)
    if backend is ExportBackend.ONNXRuntime:
        return [
            Fp8ActivationsAsCastsPass(),
            ActivationsToUint8Pass(),
            FoldWeightsPass(),
            *([WeightsToUint8Pass()] if fmt == "u8u8" else []),
            QuantizeBiasPass(),
            GatherThenDequantizePass(),
            MatMulIntegerToFloatPass(),
            KeepFloatWeightsPass(),
            FoldActivationClipPass(),
            StripMetadataPass(),
        ]
    return []


def finalize_pipeline(backend: ExportBackend, kernel_format: str | None = None) -> ir.passes.PassManager:
    """:func:`finalize_passes` as one pass: each runs once, in order."""
    return ir.passes.PassManager(finalize_passes(backend, kernel_format), steps=1)


def run_finalize(model: ir.Model, backend: ExportBackend, kernel_format: str | None = None) -> ir.passes.PassResult:
    """Legalize ``model`` for ``backend`` in place; the result says whether any pass changed it."""
    result = finalize_pipeline(backend, kernel_format)(model)
    logger.debug("finalize for %s: %s", backend.value, "modified" if result.modified else "unchanged")
    return result
