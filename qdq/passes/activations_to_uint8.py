"""Activations to uint8: int8 activation QDQ pairs become uint8 with zero point + 128, same scale.

``clamp(round(x / s) + z, -128, 127) + 128 == clamp(round(x / s) + z + 128, 0, 255)`` and
``(q + 128) - (z + 128) == q - z`` exactly in float32, so not one dequantized value changes. It
matters for speed: onnxruntime's x86 CPU kernels are U8S8 (uint8 activations, int8 weights); with
int8 activations its QDQ fusions leave many Convs in float.

Only activation pairs (``qdq.kind`` activation, and the ``constant`` operands quantized with an
activation spec, e.g. the constant of an Add, which must match the other operand's dtype) change;
weights stay int8. A zero-point initializer shared by several pairs is converted once; one shared
with a pair that stays int8 is split.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qdq.passes._qdq_nodes import const_array, is_dq, is_q, q_kind, uint8_twin

__all__ = ["ActivationsToUint8Pass", "activations_to_uint8"]

logger = logging.getLogger(__name__)

_KINDS = frozenset({"activation", "constant"})


def _convertible(node: ir.Node) -> bool:
    if not is_q(node) or q_kind(node) not in _KINDS or len(node.inputs) < 3:
        return False
    zp = node.inputs[2]
    if zp is None or zp.dtype != ir.DataType.INT8 or const_array(zp) is None:
        return False
    src = node.inputs[0]
    if q_kind(node) == "constant" and (src is None or src.const_value is None):
        return False
    # Every reader of the quantized tensor must be a DequantizeLinear sharing this zero point.
    return all(is_dq(u.node) and len(u.node.inputs) > 2 and u.node.inputs[2] is zp for u in node.outputs[0].uses())


def activations_to_uint8(model: ir.Model) -> int:
    """Switch every int8 activation QDQ pair of ``model`` to uint8 (in place); returns how many Q nodes changed."""
    graph = model.graph
    pairs: list[tuple[ir.Node, list[ir.Node]]] = []
    for node in graph:
        if _convertible(node):
            pairs.append((node, [u.node for u in node.outputs[0].uses()]))
    readers = {id(n) for q, dqs in pairs for n in (q, *dqs)}
    done: dict[int, ir.Value] = {}
    for q, dqs in pairs:
        zp = q.inputs[2]
        assert zp is not None
        new = uint8_twin(graph, zp, readers, done)
        if new is not zp:
            for n in (q, *dqs):
                n.replace_input_with(2, new)
        q.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
    if pairs:
        logger.info("%d int8 activation QDQ pairs switched to uint8", len(pairs))
    return len(pairs)


class ActivationsToUint8Pass(ir.passes.InPlacePass):
    """int8 activation QDQ pairs -> uint8 with zero point + 128 (the U8S8 layout onnxruntime's CPU kernels fuse)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=activations_to_uint8(model) > 0)
