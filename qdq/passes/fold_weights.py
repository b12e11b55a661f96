"""Fold weights: constant float -> QuantizeLinear -> DequantizeLinear becomes quantized initializer -> DequantizeLinear.

The integers come from :func:`qdq.numerics.quantize`, bit-exact with ONNX QuantizeLinear, so every
dequantized weight is unchanged; the file shrinks to the quantized dtype's size (int8: ~4x, int4: ~8x).
Works for every dtype (int8/16, int4, float8) and granularity (per tensor / channel / block). The
quantized initializer takes the Q node's output name (``{key}_quantized``); the Q node goes, and so
does the float initializer once nothing else reads it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qdq.numerics import quantize
from qdq.passes._qdq_nodes import (
    const_array,
    drop_if_unused,
    is_q,
    node_layout,
    quant_ir_dtype,
    unique_initializer_name,
)

__all__ = ["FoldWeightsPass", "fold_weights"]

logger = logging.getLogger(__name__)


def _fold(graph: ir.Graph, node: ir.Node) -> bool:
    src, scale_v = node.inputs[0], node.inputs[1]
    zp_v = node.inputs[2] if len(node.inputs) > 2 else None
    x, scale = const_array(src), const_array(scale_v)
    if x is None or scale is None or (zp_v is not None and const_array(zp_v) is None):
        return False
    zp = const_array(zp_v)
    ir_dtype = quant_ir_dtype(node)
    np_dtype = ir_dtype.numpy()
    layout = node_layout(node, x.ndim)
    saturate = bool(node.attributes.get_int("saturate", 1))
    q = quantize(np.asarray(x, np.float32), scale, zp, np_dtype, layout, saturate=saturate)

    out = node.outputs[0]
    base = out.name or f"{src.name or node.name}_quantized"  # type: ignore[union-attr]
    out.name = None  # free the name for the initializer that replaces it
    name = unique_initializer_name(graph, base)
    folded = ir.Value(name=name, shape=ir.Shape(q.shape), type=ir.TensorType(ir_dtype),
                      const_value=ir.tensor(q, dtype=ir_dtype, name=name))
    graph.register_initializer(folded)
    out.replace_all_uses_with(folded, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    drop_if_unused(graph, src)
    return True


def fold_weights(model: ir.Model) -> int:
    """Fold every QuantizeLinear of a constant in ``model`` (in place); returns how many were folded."""
    graph = model.graph
    count = 0
    for node in graph:  # onnx_ir's node list may be mutated while iterating
        if is_q(node) and _fold(graph, node):
            count += 1
    if count:
        logger.info("folded %d quantized weights", count)
    return count


class FoldWeightsPass(ir.passes.InPlacePass):
    """Store quantized weights as integer (or float8) initializers feeding their DequantizeLinear."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=fold_weights(model) > 0)
