"""Quantize bias: a constant float bias of an 8-bit Conv / ConvTranspose / Gemm becomes int32 -> DequantizeLinear.

onnxruntime's integer kernels (QLinearConv, QGemm) add the bias in the int32 accumulator, scaled by
``x_scale * w_scale``; its QDQ fusions take a bias only in that form::

    bias_int32 = round(b / (x_scale * w_scale))   # per output channel when the weight is
    DequantizeLinear(bias_int32, x_scale * w_scale, zero_point=0)

The pass fires only when the input and the weight are both int8/uint8 (per-tensor input, per-tensor
or per-output-channel weight) and the bias is a constant; int4 / int16 / float8 and per-block
operands keep their float bias (no integer kernel takes them). Gemm needs ``alpha == beta == 1``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qdq.layout import QLayout
from qdq.numerics import quantize
from qdq.passes._qdq_nodes import const_array, drop_if_unused, is_dq, node_layout, quant_ir_dtype

__all__ = ["QuantizeBiasPass", "bias_qparams", "quantize_bias"]

logger = logging.getLogger(__name__)

_8BIT = frozenset({ir.DataType.INT8, ir.DataType.UINT8})


def _weight_channel_axis(node: ir.Node) -> int | None:
    """Output-channel axis of the weight, or None if the op's bias is not per that axis."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if node.op_type == "Gemm":
        if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
            return None
        return 0 if node.attributes.get_int("transB", 0) else 1
    return None


def _rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    return None if value.const_value is None else len(value.const_value.shape)


def bias_qparams(node: ir.Node) -> tuple[np.ndarray, QLayout] | None:
    """The int32 bias scale ``x_scale * w_scale`` of ``node`` and its layout, or None when the bias must stay float."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    axis = _weight_channel_axis(node)
    x, w = node.inputs[0], node.inputs[1]
    x_dq = x.producer() if x is not None else None
    w_dq = w.producer() if w is not None else None
    if axis is None or not is_dq(x_dq) or not is_dq(w_dq):
        return None
    assert x_dq is not None and w_dq is not None
    if quant_ir_dtype(x_dq) not in _8BIT or quant_ir_dtype(w_dq) not in _8BIT:
        return None
    x_scale, w_scale = const_array(x_dq.inputs[1]), const_array(w_dq.inputs[1])
    if x_scale is None or w_scale is None or x_scale.size != 1:
        return None
    w_rank = _rank(w) or _rank(w_dq.inputs[0])
    if w_rank is None:
        return None
    w_layout = node_layout(w_dq, w_rank)
    if w_layout.block_size is not None or (w_layout.axis is not None and w_layout.axis != axis):
        return None
    scale = (np.float32(x_scale.reshape(())) * w_scale.astype(np.float32)).astype(np.float32)
    if not np.all(np.isfinite(scale)) or np.any(scale == 0):
        return None
    if w_layout.axis is None:
        return scale.reshape(()), QLayout()
    return scale.reshape(-1), QLayout(axis=0)


def _names(graph: ir.Graph, base: str) -> str:
    stem, i = base, 1
    while any(f"{stem}_{s}" in graph.initializers for s in ("quantized", "scale", "zero_point")):
        stem = f"{base}_{i}"
        i += 1
    return stem


def _quantize_one(graph: ir.Graph, node: ir.Node) -> bool:
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    b = const_array(bias)
    if bias is None or b is None or bias.dtype != ir.DataType.FLOAT or b.ndim != 1:
        return False
    qp = bias_qparams(node)
    if qp is None:
        return False
    scale, layout = qp
    if layout.axis is not None and scale.size != b.size:
        return False
    zp = np.zeros(scale.shape, np.int32)
    q = quantize(b, scale, zp, np.int32, layout)
    stem = _names(graph, bias.name or f"{node.name}_bias")
    values = []
    for suffix, arr, dt in (("quantized", q, ir.DataType.INT32), ("scale", scale, ir.DataType.FLOAT),
                            ("zero_point", zp, ir.DataType.INT32)):
        name = f"{stem}_{suffix}"
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(dt),
                     const_value=ir.tensor(arr, dtype=dt, name=name))
        graph.register_initializer(v)
        values.append(v)
    attrs = [ir.AttrInt64("axis", 0)] if layout.axis is not None else []
    dq = ir.Node("", "DequantizeLinear", values, attributes=attrs, name=f"{stem}_DQ", num_outputs=1)
    out = dq.outputs[0]
    out.name = f"{stem}_dequantized"
    out.type = ir.TensorType(ir.DataType.FLOAT)
    out.shape = ir.Shape(b.shape)
    graph.insert_before(node, dq)
    node.replace_input_with(2, out)
    drop_if_unused(graph, bias)
    return True


def quantize_bias(model: ir.Model) -> int:
    """Quantize every eligible bias of ``model`` to int32 (in place); returns how many."""
    graph = model.graph
    count = 0
    for node in graph:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and node.domain in ("", "ai.onnx"):
            count += _quantize_one(graph, node)
    if count:
        logger.info("%d biases quantized to int32", count)
    return count


class QuantizeBiasPass(ir.passes.InPlacePass):
    """Constant float bias of 8-bit Conv / ConvTranspose / Gemm -> int32 initializer -> DequantizeLinear."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=quantize_bias(model) > 0)
