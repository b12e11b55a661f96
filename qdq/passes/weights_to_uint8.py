"""Weights to uint8: the int8 weights of 8-bit Conv / ConvTranspose / Gemm / MatMul become uint8, zero point + 128.

``(w + 128) - (z + 128) == w - z``: not one dequantized weight changes. What changes is the kernel
onnxruntime picks for the fused op: U8U8 instead of U8S8. On x86 CPUs without VNNI/AMX its U8S8 kernels add
pairs of products in saturating int16 and clip (:mod:`qdq.backends.host_cpu`); its U8U8 kernels do not. The
onnxruntime pipeline runs this pass for ``kernel_format="u8u8"``, the default on such a CPU.

A weight converts when it is a constant int8 DequantizeLinear (no ``block_size``) with a code outside
[-64, 63] (inside, a pair of products fits int16: onnxruntime's ``session.x64quantprecision`` uses the same
rule for the few ops it converts itself) read as input 1 of
Conv / ConvTranspose / Gemm / MatMul whose input 0 is itself an 8-bit DequantizeLinear (an integer kernel:
weight-only models keep int8, which changes nothing there). A weight something else also reads as int8 (a tied
embedding table that GatherThenDequantize gathers as integers) gets a uint8 copy for its kernels; a
DequantizeLinear also read by another op (a Reshape) gets a copy for its kernels. A zero point
shared with a weight that stays int8 is split; a missing one becomes an explicit 128.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir._core import Usage  # (node, idx) of Value.uses(); not re-exported by onnx_ir

from qdq.passes._qdq_nodes import add_initializer, const_array, is_dq, quant_ir_dtype, uint8_twin

__all__ = ["WeightsToUint8Pass", "int8_kernel_weights", "weights_to_uint8"]

logger = logging.getLogger(__name__)

_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_8BIT = (ir.DataType.UINT8, ir.DataType.INT8)


def _int8_weight(dq: ir.Node) -> bool:
    """``dq`` dequantizes a constant int8 weight (no blocks) whose codes leave [-64, 63]."""
    w = dq.inputs[0]
    block: int = dq.attributes.get_int("block_size", 0)
    if w is None or w.const_value is None or w.dtype != ir.DataType.INT8 or block:
        return False
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zp is not None and const_array(zp) is None:
        return False
    codes = w.const_value.numpy()
    # 7-bit codes: 255 * 64 * 2 fits int16, so U8S8 cannot saturate (onnxruntime's own rule)
    return not (codes.size and int(codes.min()) >= -64 and int(codes.max()) <= 63)


def _kernel_use(use: Usage) -> bool:
    """``use`` is input 1 of an op whose input 0 is 8-bit QDQ (an integer kernel)."""
    op = use.node
    if op.op_type not in _OPS or op.domain not in ("", "ai.onnx") or use.idx != 1:
        return False
    x = op.inputs[0].producer() if op.inputs[0] is not None else None
    return is_dq(x) and quant_ir_dtype(x) in _8BIT  # type: ignore[arg-type]


def _split_kernel_uses(graph: ir.Graph, dq: ir.Node, kernel: list[Usage]) -> ir.Node:
    """A copy of ``dq`` for the kernel readers ``kernel``; the original keeps its other readers (a Reshape, a
    graph output), which read float values either way."""
    twin = ir.Node(dq.domain, "DequantizeLinear", list(dq.inputs), attributes=list(dq.attributes.values()),
                   name=f"{dq.name}_kernel", num_outputs=1)
    out = twin.outputs[0]
    out.name = f"{dq.outputs[0].name}_kernel"
    out.type, out.shape = dq.outputs[0].type, dq.outputs[0].shape
    graph.insert_after(dq, [twin])
    for use in kernel:
        use.node.replace_input_with(use.idx, out)
    return twin


def _convertible(graph: ir.Graph, *, split: bool = False) -> list[ir.Node]:
    """The weight DequantizeLinear nodes to convert: all readers of each of their weights qualify.

    ``split``: a DequantizeLinear read by integer kernels and by something else first gets a copy for its kernels
    (which then qualifies); without it such a node counts as convertible but the graph is left as is."""
    by_weight: dict[int, list[ir.Node]] = {}
    ok: set[int] = set()
    for node in list(graph):
        if not (is_dq(node) and node.inputs[0] is not None and node.inputs[0].is_initializer()):
            continue
        by_weight.setdefault(id(node.inputs[0]), []).append(node)
        if not _int8_weight(node):
            continue
        uses = list(node.outputs[0].uses())
        kernel = [u for u in uses if _kernel_use(u)]
        if not kernel:
            continue
        if len(kernel) == len(uses) and not node.outputs[0].is_graph_output():
            ok.add(id(node))
        elif split:
            twin = _split_kernel_uses(graph, node, kernel)
            by_weight[id(node.inputs[0])].append(twin)
            ok.add(id(twin))
        else:
            ok.add(id(node))
    chosen: list[ir.Node] = []
    for dqs in by_weight.values():
        # another reader (a Gather of a tied table, a DQ kept for a Reshape) keeps the int8 original
        chosen.extend(dq for dq in dqs if id(dq) in ok)
    return chosen


def int8_kernel_weights(model: ir.Model) -> int:
    """How many int8 weights of ``model`` feed 8-bit integer kernels (what :func:`weights_to_uint8` converts)."""
    return len({id(dq.inputs[0]) for dq in _convertible(model.graph)})


def weights_to_uint8(model: ir.Model) -> int:
    """Store the int8 weights of ``model``'s 8-bit integer-kernel ops as uint8 (in place); returns how many."""
    graph = model.graph
    chosen = _convertible(graph, split=True)
    readers = {id(dq) for dq in chosen}
    done: dict[int, ir.Value] = {}
    converted: set[int] = set()
    for dq in chosen:
        w = dq.inputs[0]
        assert w is not None
        converted.add(id(w))
        new_w = uint8_twin(graph, w, readers, done)  # in place, or a copy when something else reads the int8 codes
        if new_w is not w:
            dq.replace_input_with(0, new_w)
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if zp is None:  # int8 zero point 0 -> an explicit uint8 128, shaped like the scale
            scale = const_array(dq.inputs[1])
            shape = () if scale is None else scale.shape
            dq.resize_inputs(3)
            dq.replace_input_with(2, add_initializer(graph, f"{w.name or dq.name or 'weight'}_zero_point",
                                                     np.full(shape, 128, np.uint8)))
            continue
        new = uint8_twin(graph, zp, readers, done)
        if new is not zp:
            dq.replace_input_with(2, new)
    if converted:
        logger.info("%d int8 weights stored as uint8 (onnxruntime's U8U8 kernels: no int16 saturation)", len(converted))
    return len(converted)


class WeightsToUint8Pass(ir.passes.InPlacePass):
    """int8 weights of integer-kernel ops -> uint8 with zero point + 128 (onnxruntime's U8U8 kernels)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=weights_to_uint8(model) > 0)
