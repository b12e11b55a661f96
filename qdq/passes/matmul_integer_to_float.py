"""MatMul integer to float: an 8-bit QDQ MatMul and the bias / scalar scale after it become one onnxruntime kernel.

onnxruntime turns ``DequantizeLinear(a) -> MatMul <- DequantizeLinear(w)`` whose output is not requantized
into its ``com.microsoft.MatMulIntegerToFloat`` (integer GEMM, float output), but leaves the bias ``Add``
that follows every Linear layer, and the ``Mul`` by ``1/sqrt(d)`` after attention scores, as separate float
passes over the output (and a bias Add before Gelu becomes BiasGelu, twice the cost of Gelu). Its dynamic
quantizer fuses the bias; its static QDQ path does not. This pass builds the kernel itself::

    MatMul(DQ(a_q, sa, za), DQ(w_q, sw, zw)) [+ bias] [* c | / c]
    -> MatMulIntegerToFloat(a_q, w_q, sa * c, sw, za, zw, bias * c)

which computes ``(a_q - za)(w_q - zw) * (sa * c) * sw + bias * c``: the same value up to float rounding of
the rescale (onnxruntime's own fusion already computes ``acc * (sa * sw)``). It fires only when something is
absorbed (a plain QDQ MatMul is left to onnxruntime), for int8/uint8 operands, a per-tensor ``a`` and a
per-tensor or per-column ``w``, a constant bias along the output columns and constant scalar ``c``; every
absorbed node's output must have that single reader.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qdq.graph.readers import sole_reader
from qdq.passes._qdq_nodes import (
    add_initializer,
    const_array,
    drop_if_unused,
    is_dq,
    quant_ir_dtype,
)

__all__ = ["MatMulIntegerToFloatPass", "fuse_matmul_integer_to_float"]

logger = logging.getLogger(__name__)

_8BIT = frozenset({ir.DataType.INT8, ir.DataType.UINT8})
_MS = "com.microsoft"


def _columns(dq: ir.Node) -> int | None:
    """The last dimension of a DQ's integer input (the MatMul's output columns when it is the ``B`` operand)."""
    q = dq.inputs[0]
    assert q is not None
    shape = q.const_value.shape if q.const_value is not None else q.shape
    if shape is None or len(shape) < 1 or not isinstance(shape[-1], int):
        return None
    return int(shape[-1])


def _dq_operand(value: ir.Value | None, *, per_column: bool) -> ir.Node | None:
    """The 8-bit DQ producing ``value``: per tensor, or (``per_column``) per column of a 2-D constant."""
    dq = value.producer() if value is not None else None
    if not is_dq(dq):
        return None
    assert dq is not None
    q, scale_v = dq.inputs[0], dq.inputs[1]
    zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
    block: int = dq.attributes.get_int("block_size", 0)
    if q is None or quant_ir_dtype(dq) not in _8BIT or block:
        return None
    scale = const_array(scale_v)
    if scale is None or scale.dtype != np.float32 or (zp_v is not None and const_array(zp_v) is None):
        return None
    if scale.size == 1:
        return dq
    shape = q.const_value.shape if q.const_value is not None else None
    axis = dq.attributes.get_int("axis", 1)
    if not per_column or shape is None or len(shape) != 2 or axis % 2 != 1 or scale.shape != (shape[1],):
        return None
    return dq


def _bias_of(add: ir.Node, value: ir.Value, columns: int | None) -> np.ndarray | None:
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    b = const_array(other)
    if b is None or b.dtype != np.float32 or columns is None or b.size != columns or b.shape[-1:] != (columns,):
        return None
    return b.reshape(-1)


def _scalar_of(node: ir.Node, value: ir.Value) -> float | None:
    if node.op_type == "Div" and node.inputs[0] is not value:
        return None  # c / x is not a rescale
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    c = const_array(other)
    if c is None or c.dtype != np.float32 or c.size != 1 or not np.isfinite(c).all() or float(c.reshape(())) == 0:
        return None
    return float(c.reshape(())) if node.op_type == "Mul" else 1.0 / float(c.reshape(()))


def _absorb(out: ir.Value, columns: int | None) -> tuple[list[ir.Node], np.ndarray | None, float]:
    """The Add / Mul / Div chain after a MatMul that folds into the kernel: (nodes, bias, scale)."""
    nodes: list[ir.Node] = []
    bias: np.ndarray | None = None
    factor = 1.0
    while True:
        user = sole_reader(out)
        if user is None or user.domain not in ("", "ai.onnx") or len(user.inputs) != 2:
            break
        if user.op_type == "Add" and bias is None:
            b = _bias_of(user, out, columns)
            if b is None:
                break
            bias = b
        elif user.op_type in ("Mul", "Div"):
            c = _scalar_of(user, out)
            if c is None:
                break
            factor *= c
            if bias is not None:
                bias = bias * np.float32(c)
        else:
            break
        nodes.append(user)
        out = user.outputs[0]
    return nodes, bias, factor


def fuse_matmul_integer_to_float(model: ir.Model) -> int:
    """Rewrite each absorbable QDQ MatMul of ``model``'s main graph in place; returns how many."""
    graph = model.graph
    done = 0
    for mm in [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")]:
        out = mm.outputs[0]
        if out.dtype not in (None, ir.DataType.FLOAT):
            continue
        dq_b = _dq_operand(mm.inputs[1], per_column=True)
        dq_a = _dq_operand(mm.inputs[0], per_column=False)
        if dq_a is None or dq_b is None:
            continue
        columns = _columns(dq_b)
        absorbed, bias, factor = _absorb(out, columns)
        if not absorbed:
            continue
        a_scale = dq_a.inputs[1]
        assert a_scale is not None
        if factor != 1.0:
            sa = const_array(a_scale)
            assert sa is not None
            a_scale = add_initializer(graph, f"{mm.name}_a_scale", (sa.reshape(()) * np.float32(factor)).astype(np.float32))
        bias_v = add_initializer(graph, f"{mm.name}_bias", bias.astype(np.float32)) if bias is not None else None
        inputs = [dq_a.inputs[0], dq_b.inputs[0], a_scale, dq_b.inputs[1],
                  dq_a.inputs[2] if len(dq_a.inputs) > 2 else None,
                  dq_b.inputs[2] if len(dq_b.inputs) > 2 else None, bias_v]
        while inputs[-1] is None:
            inputs.pop()
        fused = ir.node("MatMulIntegerToFloat", inputs, domain=_MS)  # named after the MatMul below
        graph.insert_before(mm, fused)
        last = absorbed[-1].outputs[0]
        y = fused.outputs[0]
        y.dtype, y.shape = ir.DataType.FLOAT, last.shape
        last.replace_all_uses_with(y, replace_graph_outputs=True)
        name, node_name = last.name, mm.name
        for node in reversed([mm, *absorbed]):
            consts = [v for v in node.inputs if v is not None and v.const_value is not None]
            graph.remove(node, safe=True)
            for v in consts:
                drop_if_unused(graph, v)
        y.name = name
        fused.name = node_name  # the op name configs and reports use
        for dq in (dq_a, dq_b):
            if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                graph.remove(dq, safe=True)
        done += 1
    if done:
        model.opset_imports.setdefault(_MS, 1)
        logger.debug("fused %d QDQ MatMuls with their bias/scale into MatMulIntegerToFloat", done)
    return done


class MatMulIntegerToFloatPass(ir.passes.InPlacePass):
    """QDQ MatMul + bias Add / scalar Mul as one ``com.microsoft.MatMulIntegerToFloat``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=fuse_matmul_integer_to_float(model) > 0)
