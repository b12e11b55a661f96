"""Gather, then dequantize: an embedding table stays integer in memory and only the looked-up rows are dequantized.

After :class:`~qdq.passes.fold_weights.FoldWeightsPass` an embedding table is ``DequantizeLinear(q_table) ->
Gather(indices)``; onnxruntime does not constant-fold a DequantizeLinear (it keeps QDQ units for its
fusions), so every run would dequantize the whole table (MiniLM: 11.7 M values, slower than FP32). The pass
swaps the two: rows of the integer table, and their scales, are gathered first::

    y = (Cast(Gather(q_table, i)) - Gather(zp, i)[..., None]) * Gather(scale, i)[..., None]   # per row (axis 0)
    y = DequantizeLinear(Gather(q_table, i), scale, zp)                                      # per tensor

Both are DequantizeLinear's own arithmetic (``(q - zp) * scale`` in float32) on the same elements: the
values are bit-identical. Tables with 8-bit per-row or per-tensor qparams only (ONNX Gather has no 4-bit
type; qdq plans 8-bit tables).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qdq.passes._qdq_nodes import add_initializer, const_array, drop_if_unused, is_dq

__all__ = ["GatherThenDequantizePass", "gather_then_dequantize"]

logger = logging.getLogger(__name__)

_8BIT = frozenset({ir.DataType.INT8, ir.DataType.UINT8})


def _rewritable(dq: ir.Node) -> list[ir.Node] | None:
    table = dq.inputs[0]
    if table is None or table.const_value is None or table.const_value.dtype not in _8BIT:
        return None
    if len(table.const_value.shape) != 2 or dq.attributes.get_int("block_size"):
        return None
    scale = const_array(dq.inputs[1])
    axis = dq.attributes.get_int("axis")
    if scale is None or (scale.size != 1 and (scale.ndim != 1 or (1 if axis is None else axis) not in (0, -2))):
        return None
    out = dq.outputs[0]
    if out.is_graph_output() or not out.uses():
        return None
    gathers = [u.node for u in out.uses()]
    if any(g.op_type != "Gather" or u.idx != 0 or (g.attributes.get_int("axis") or 0) != 0
           for g, u in zip(gathers, out.uses(), strict=True)):
        return None
    return gathers


def gather_then_dequantize(model: ir.Model) -> int:
    """Rewrite every ``DequantizeLinear(8-bit table) -> Gather`` of ``model`` in place; returns how many."""
    graph = model.graph
    done = 0
    for dq in [n for n in graph if is_dq(n)]:
        gathers = _rewritable(dq)
        if gathers is None:
            continue
        table, scale_v = dq.inputs[0], dq.inputs[1]
        assert table is not None and scale_v is not None
        zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
        originals = (scale_v, zp_v)
        scale = const_array(scale_v)
        assert scale is not None
        zp = const_array(zp_v)
        per_row = scale.size != 1
        if not per_row and scale.ndim != 0:  # a [1] scale would read as per-axis on the gathered rows
            scale_v = add_initializer(graph, f"{scale_v.name}_scalar", scale.reshape(()))
            if zp is not None:
                zp_v = add_initializer(graph, f"{zp_v.name}_scalar", zp.reshape(()))  # type: ignore[union-attr]
        # per-row constants, once per table (a table may be read by several Gathers)
        axes = add_initializer(graph, f"{table.name}_last_axis", np.array([-1], np.int64)) if per_row else None
        zf = (add_initializer(graph, f"{table.name}_zero_points", zp.astype(np.float32).reshape(-1))
              if per_row and zp is not None and np.any(zp) else None)
        for g in gathers:
            idx = g.inputs[1]
            out = g.outputs[0]
            rows = ir.node("Gather", [table, idx], attributes={"axis": 0}, name=f"{g.name}_rows")
            new_nodes = [rows]
            if not per_row:
                y = ir.node("DequantizeLinear", [rows.outputs[0], scale_v, *([zp_v] if zp_v is not None else [])],
                            name=f"{g.name}_dequantize")
                new_nodes.append(y)
            else:
                assert axes is not None
                cast = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{g.name}_cast")
                s_rows = ir.node("Gather", [scale_v, idx], attributes={"axis": 0}, name=f"{g.name}_scales")
                s_col = ir.node("Unsqueeze", [s_rows.outputs[0], axes], name=f"{g.name}_scales_col")
                new_nodes += [cast, s_rows, s_col]
                value = cast.outputs[0]
                if zf is not None:
                    z_rows = ir.node("Gather", [zf, idx], attributes={"axis": 0}, name=f"{g.name}_zps")
                    z_col = ir.node("Unsqueeze", [z_rows.outputs[0], axes], name=f"{g.name}_zps_col")
                    sub = ir.node("Sub", [value, z_col.outputs[0]], name=f"{g.name}_centre")
                    new_nodes += [z_rows, z_col, sub]
                    value = sub.outputs[0]
                y = ir.node("Mul", [value, s_col.outputs[0]], name=f"{g.name}_dequantize")
                new_nodes.append(y)
            graph.insert_before(g, new_nodes)
            y_out = y.outputs[0]
            y_out.shape = out.shape
            if out.dtype is not None:
                y_out.dtype = out.dtype
            out.replace_all_uses_with(y_out, replace_graph_outputs=True)
            name = out.name
            graph.remove(g, safe=True)
            y_out.name = name
        graph.remove(dq, safe=True)
        for v in originals:
            drop_if_unused(graph, v)
        done += 1
    if done:
        logger.debug("gathered %d embedding tables before dequantizing", done)
    return done


class GatherThenDequantizePass(ir.passes.InPlacePass):
    """``DequantizeLinear(8-bit table) -> Gather`` as Gather -> dequantize of the rows (bit-identical)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=gather_then_dequantize(model) > 0)
