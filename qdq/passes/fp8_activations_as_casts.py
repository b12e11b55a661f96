"""Rewrite float8 activation QuantizeLinear -> DequantizeLinear pairs as Div -> Cast -> Cast -> Mul.

Why: onnxruntime 1.31's CPU QDQ selectors fuse a Conv whose inputs come from float8 DQ nodes
into QLinearConv, which has no float8 kernel, and the session then fails to load
("Type 'tensor(float8e4m3fn)' of input parameter ... of operator (QLinearConv) is invalid").
The cast form computes exactly ``DQ(Q(x))`` (float32 division by the scale, saturating
round-to-nearest-even cast to float8, multiply back) and is never matched by those selectors.
Weights keep their float8 initializer + DequantizeLinear (1 byte per value on disk).
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["Fp8ActivationsAsCastsPass"]

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
            div = ir.node("Div", [x, scale], name=f"{q.name}_div")
            to_fp8 = ir.node("Cast", [div.outputs[0]], attributes={"to": zp.dtype, "saturate": saturate},
                             name=f"{q.name}_cast")
            back = ir.node("Cast", [to_fp8.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{q.name}_uncast")
            mul = ir.node("Mul", [back.outputs[0], scale], name=f"{q.name}_mul")
            to_fp8.metadata_props.update(q.metadata_props)
            graph.insert_after(q, [div, to_fp8, back, mul])
            for dq in dqs:
                out = dq.outputs[0]
                name = out.name
                new = mul.outputs[0]
                new.dtype, new.shape = out.dtype or ir.DataType.FLOAT, out.shape
                out.replace_all_uses_with(new, replace_graph_outputs=True)
                out.name = f"{name}_removed"
                mul.outputs[0].name = name
                graph.remove(dq, safe=True)
            graph.remove(q, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
