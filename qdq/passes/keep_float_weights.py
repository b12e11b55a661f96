"""Keep float weights float: a Conv / ConvTranspose / Gemm the config leaves float, reading a dequantized
activation, gets its own per-channel DequantizeLinear so onnxruntime does not quantize its weight.

onnxruntime's ``WeightBiasQuantization`` graph transformer (level 1, so on by default) looks for Conv,
ConvTranspose and Gemm whose input 0 comes from a DequantizeLinear with a per-tensor scale and whose weight is
a float32 initializer, and quantizes that weight itself: symmetric int8 **per tensor**, bias int32. A
depthwise conv left float on purpose (``op_name_configs: {conv: null}``, or an automatic fallback) is then
quantized worse than qdq would have done it: on EfficientNet-Lite0, leaving the second conv float took the
logits from 23.1 to 11.4 dB.

The transformer only fires on a per-tensor input scale. This pass gives such an op a DequantizeLinear of its
own whose scale and zero point are the same values repeated per input channel (axis 1): every dequantized value
is identical, and the transformer leaves the op alone. Other readers keep the shared per-tensor DQ (and their
integer kernels).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qdq.passes._qdq_nodes import add_initializer, const_array, is_dq

__all__ = ["KeepFloatWeightsPass", "keep_float_weights"]

logger = logging.getLogger(__name__)

_OPS = ("Conv", "ConvTranspose", "Gemm")


def _input_channels(node: ir.Node) -> int | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT:
        return None
    shape = w.const_value.numpy().shape
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0) or len(shape) != 2:
            return None
        return int(shape[1] if node.attributes.get_int("transB", 0) else shape[0])
    if len(shape) < 3:
        return None
    group: int = node.attributes.get_int("group", 1)
    return int(shape[1]) * group if node.op_type == "Conv" else int(shape[0])


def keep_float_weights(model: ir.Model) -> int:
    """Give every float-weight Conv/ConvTranspose/Gemm reading a per-tensor DQ its own per-channel DQ."""
    graph = model.graph
    done = 0
    for node in [n for n in graph if n.op_type in _OPS and n.domain in ("", "ai.onnx")]:
        x = node.inputs[0]
        dq = x.producer() if x is not None else None
        if not is_dq(dq):
            continue
        assert dq is not None
        channels = _input_channels(node)
        scale = const_array(dq.inputs[1])
        zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
        zp = const_array(zp_v)
        if channels is None or channels < 2 or scale is None or scale.size != 1 or (zp_v is not None and zp is None):
            continue
        base = f"{node.name}_float_input"
        s = add_initializer(graph, f"{base}_scale", np.full(channels, scale.reshape(()), scale.dtype))
        inputs = [dq.inputs[0], s]
        if zp is not None:
            inputs.append(add_initializer(graph, f"{base}_zero_point", np.full(channels, zp.reshape(()), zp.dtype)))
        own = ir.node("DequantizeLinear", inputs, attributes={"axis": 1}, name=f"{base}_dq")
        assert x is not None
        own.outputs[0].name = f"{x.name}_{node.name}"
        own.outputs[0].shape = x.shape
        if x.dtype is not None:
            own.outputs[0].dtype = x.dtype
        graph.insert_before(node, own)
        node.replace_input_with(0, own.outputs[0])
        if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
            graph.remove(dq, safe=True)
        done += 1
    if done:
        logger.debug("%d float-weight ops read a per-channel copy of their input DQ", done)
    return done


class KeepFloatWeightsPass(ir.passes.InPlacePass):
    """Float-weight Conv/ConvTranspose/Gemm after a per-tensor DQ: a private per-channel DQ (same values)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=keep_float_weights(model) > 0)
