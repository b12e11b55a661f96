"""Rewrite float8 activation QuantizeLinear -> DequantizeLinear pairs as Div -> Cast -> Cast -> Mul.

Why: onnxruntime 1.31's CPU QDQ selectors fuse a Conv whose inputs come from float8 DQ nodes
into QLinearConv, which has no float8 kernel, and the session then fails to load
("Type 'tensor(float8e4m3fn)' of input parameter ... of operator (QLinearConv) is invalid").
The cast form computes exactly ``DQ(Q(x))`` (float32 division by the scale, saturating
round-to-nearest-even cast to float8, multiply back) and is never matched by those selectors.
Weights keep their float8 initializer + DequantizeLinear (1 byte per value on disk).
A float16 / bfloat16 tensor is computed in float32 and cast back at the end: the quotient then rounds once
more only to float32 (as the float32 path does), and the product of a float8 value and a 16-bit scale is
exact in float32, so the final cast rounds it exactly as DequantizeLinear would.
"""

from __future__ import annotations

import onnx_ir as ir

from qdq.graph.readers import sole_reader

__all__ = ["Fp8ActivationsAsCastsPass", "restore_fp8_pairs"]

_FP8 = frozenset({ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2})


class Fp8ActivationsAsCastsPass(ir.passes.InPlacePass):
    """Replace every float8 Q->DQ pair on a non-constant tensor by its exact cast form."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for q in list(graph):
            if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.inputs) < 3:
                continue
            x, scale, zp = q.inputs[0], q.inputs[1], q.inputs[2]
            if x is None or x.const_value is not None or zp is None or zp.dtype not in _FP8:
                continue
            block: int = q.attributes.get_int("block_size", 0)
            per_channel = scale is not None and scale.shape is not None and len(scale.shape) > 0
            if (q.attributes.get_int("axis", 1) != 1 or block) and per_channel:
                continue  # per-channel activations: leave as QDQ
            dqs = [u.node for u in q.outputs[0].uses()]
            if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.outputs[0].is_graph_output():
                continue
            saturate = q.attributes.get_int("saturate", 1)
            assert scale is not None
            dtype: ir.DataType = scale.dtype or x.dtype or ir.DataType.FLOAT  # DequantizeLinear's output type
            widen: list[ir.Node] = []
            if dtype != ir.DataType.FLOAT:  # float16 / bfloat16: compute in float32
                widen = [ir.node("Cast", [x], attributes={"to": ir.DataType.FLOAT}, name=f"{q.name}_x_f32"),
                         ir.node("Cast", [scale], attributes={"to": ir.DataType.FLOAT}, name=f"{q.name}_scale_f32")]
                x, scale = widen[0].outputs[0], widen[1].outputs[0]
            div = ir.node("Div", [x, scale], name=f"{q.name}_div")
            to_fp8 = ir.node("Cast", [div.outputs[0]], attributes={"to": zp.dtype, "saturate": saturate},
                             name=f"{q.name}_cast")
            back = ir.node("Cast", [to_fp8.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{q.name}_uncast")
            mul = ir.node("Mul", [back.outputs[0], scale], name=f"{q.name}_mul")
            tail = [mul]
            if dtype != ir.DataType.FLOAT:
                tail.append(ir.node("Cast", [mul.outputs[0]], attributes={"to": dtype}, name=f"{q.name}_narrow"))
            to_fp8.metadata_props.update(q.metadata_props)
            graph.insert_after(q, [*widen, div, to_fp8, back, *tail])
            new = tail[-1].outputs[0]
            for k, dq in enumerate(dqs):
                out = dq.outputs[0]
                name = out.name
                target = new
                if k and out.is_graph_output():  # the value already carries the first reader's name: a copy
                    copy = ir.node("Identity", [new], name=f"{q.name}_copy{k}")
                    graph.insert_after(tail[-1], copy)
                    target = copy.outputs[0]
                target.dtype, target.shape = out.dtype or dtype, out.shape
                out.replace_all_uses_with(target, replace_graph_outputs=True)
                out.name = f"{name}_removed"
                if k == 0 or target is not new:
                    target.name = name
                graph.remove(dq, safe=True)
            graph.remove(q, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _reader(value: ir.Value, op_type: str) -> ir.Node | None:
    """``value``'s only reader when it is an ``op_type`` (:func:`~qdq.graph.readers.sole_reader`)."""
    node = sole_reader(value)
    return node if node is not None and node.op_type == op_type else None


def restore_fp8_pairs(model: ir.Model) -> int:
    """The inverse rewrite, for analysis (``qdq report``, per-layer error): every ``Div -> Cast(float8) -> Cast ->
    Mul`` (with its float16 widening/narrowing casts) back to the QuantizeLinear -> DequantizeLinear pair it
    computes, named as before the rewrite. In place; returns how many pairs came back. The result is for
    onnxruntime sessions without graph optimization (the reason for the cast form still holds)."""
    import ml_dtypes
    import numpy as np

    from qdq.passes._qdq_nodes import add_initializer

    graph = model.graph
    np_dtypes = {ir.DataType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E5M2: ml_dtypes.float8_e5m2}
    restored = 0
    for cast in list(graph):
        to = cast.attributes.get_int("to", 0) if cast.op_type == "Cast" else 0
        if not to or ir.DataType(to) not in _FP8 or cast.inputs[0] is None:
            continue
        div = cast.inputs[0].producer()
        back = _reader(cast.outputs[0], "Cast")
        mul = None if back is None else _reader(back.outputs[0], "Mul")
        if div is None or div.op_type != "Div" or back is None or mul is None or div.inputs[1] not in mul.inputs:
            continue
        x, scale = div.inputs[0], div.inputs[1]
        assert x is not None and scale is not None
        removed: list[ir.Node] = [div, cast, back, mul]
        end: ir.Node = mul
        wx, ws = x.producer(), scale.producer()
        narrow = _reader(mul.outputs[0], "Cast")
        if (narrow is not None and wx is not None and ws is not None and wx.op_type == ws.op_type == "Cast"
                and (wx.name or "").endswith("_x_f32") and (ws.name or "").endswith("_scale_f32")):
            x, scale, end = wx.inputs[0], ws.inputs[0], narrow
            removed.append(narrow)
            assert x is not None and scale is not None
        name = cast.name[:-len("_cast")] if cast.name and cast.name.endswith("_cast") else cast.name
        zp = add_initializer(graph, f"{name}_zero_point", np.zeros((), np_dtypes[ir.DataType(to)]))
        q = ir.node("QuantizeLinear", [x, scale, zp], attributes={"saturate": cast.attributes.get_int("saturate", 1)},
                    name=name)
        q.metadata_props.update(cast.metadata_props)
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{name}_dq")
        graph.insert_after(end, [q, dq])
        out = end.outputs[0]
        label = out.name
        if out.dtype is not None:
            dq.outputs[0].dtype = out.dtype
        dq.outputs[0].shape = out.shape
        out.replace_all_uses_with(dq.outputs[0], replace_graph_outputs=True)
        out.name = f"{label}_removed"
        dq.outputs[0].name = label
        for node in reversed(removed):
            graph.remove(node, safe=True)
        for widening in (wx, ws):
            if widening is not None and widening.graph is graph and not any(o.uses() for o in widening.outputs):
                graph.remove(widening, safe=True)
        restored += 1
    return restored
