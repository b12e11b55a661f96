"""Insert: materialise a QuantPlan as QuantizeLinear -> DequantizeLinear pairs.

Naming contract (the torch mirror, finalize passes and reports rely on it), for target ``key``:
Q node ``{key}_Q``, DQ node ``{key}_DQ``, scale ``{key}_scale``, zero point ``{key}_zero_point``;
the Q node carries ``metadata_props`` ``qdq.target`` (key), ``qdq.tensor`` (the tensor's name in the float model),
``qdq.kind`` (weight / constant / activation) and ``qdq.spec`` (JSON of the spec). Targets that
share qparams (pass-through ops) reuse the root's scale/zero-point initializers: one Value,
so the sharing survives any later edit. Weights stay float initializers feeding Q -> DQ
(trainable, re-quantizable); finalize folds them to integers.

Wiring is by ``Value``: every rewire is O(uses), never a graph scan.
"""

from __future__ import annotations

import json
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qdq.dtypes import QDType
from qdq.graph.opset import ensure_opset, required_opset
from qdq.plan import QuantPlan, QuantTarget
from qdq.qparams import QParams

__all__ = ["insert_qdq", "scale_array", "zero_point_array"]

logger = logging.getLogger(__name__)

_HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
HALF_OPSET = 19  # QuantizeLinear/DequantizeLinear accept float16 / bfloat16 tensors and scales from opset 19


def zero_point_array(qp: QParams, dtype: QDType) -> np.ndarray:
    """The zero point stored in the quantized dtype (what ONNX QuantizeLinear expects)."""
    zp = np.asarray(qp.zero_point)
    if dtype.is_float:
        return np.zeros(zp.shape, dtype.np_dtype)
    return zp.astype(np.int64).astype(dtype.np_dtype)


def scale_array(qp: QParams, dtype: ir.DataType | None) -> np.ndarray:
    """The scale in the dtype of the tensor it quantizes (QuantizeLinear ties x and y_scale to one type).

    float16 / bfloat16 scales are clamped to that type's smallest normal number, so none rounds to zero.
    """
    scale = np.asarray(qp.scale, np.float32)
    if dtype not in _HALF:
        return scale
    np_dtype = dtype.numpy()
    tiny = float(ml_dtypes.finfo(np_dtype).smallest_normal)
    return np.maximum(scale, tiny).astype(np_dtype)


def _initializer(name: str, array: np.ndarray) -> ir.Value:
    """A constant Value with its type and shape set (onnx_ir does not infer them from const_value)."""
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)


def _qdq_attributes(target: QuantTarget) -> list[ir.Attr]:
    attrs: list[ir.Attr] = []
    if target.layout.axis is not None:
        attrs.append(ir.AttrInt64("axis", target.layout.axis))
    if target.layout.block_size is not None:
        attrs.append(ir.AttrInt64("block_size", target.layout.block_size))
    return attrs


class _Inserter:
    def __init__(self, model: ir.Model, plan: QuantPlan, qparams: dict[str, QParams]) -> None:
        self.model = model
        self.graph = model.graph
        self.plan = plan
        self.qparams = qparams
        self.params: dict[str, tuple[ir.Value, ir.Value]] = {}
        self.values: dict[str, ir.Value] = {}
        self.nodes: dict[str, ir.Node] = {}
        for v in self.graph.inputs:
            self.values[v.name or ""] = v
        for name, v in self.graph.initializers.items():
            self.values[name] = v
        for node in self.graph:
            if node.name:
                self.nodes[node.name] = node
            for out in node.outputs:
                if out.name:
                    self.values[out.name] = out

    def _param_values(self, target: QuantTarget) -> tuple[ir.Value, ir.Value]:
        root = self.plan.root(target.key)
        if root not in self.params:
            qp = self.qparams.get(root)
            if qp is None:
                raise KeyError(f"no qparams for target '{root}'")
            spec = self.plan.targets[root].spec
            scale = _initializer(f"{root}_scale", scale_array(qp, self.values[self.plan.targets[root].tensor].dtype))
            zp = _initializer(f"{root}_zero_point", zero_point_array(qp, spec.dtype))
            self.graph.register_initializer(scale)
            self.graph.register_initializer(zp)
            self.params[root] = (scale, zp)
        return self.params[root]

    def insert(self, target: QuantTarget) -> None:
        value = self.values.get(target.tensor)
        if value is None:
            raise KeyError(f"tensor '{target.tensor}' of target '{target.key}' is not in the graph")
        scale, zp = self._param_values(target)
        attrs = _qdq_attributes(target)
        q = ir.Node("", "QuantizeLinear", [value, scale, zp], attributes=attrs, name=f"{target.key}_Q",
                    num_outputs=1)
        q.outputs[0].name = f"{target.key}_quantized"
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zp], attributes=attrs,
                     name=f"{target.key}_DQ", num_outputs=1)
        dq_out = dq.outputs[0]
        dq_out.name = f"{target.key}_dequantized"
        dq_out.dtype = ir.DataType.FLOAT if value.dtype is None else value.dtype
        dq_out.shape = value.shape
        q.metadata_props.update({
            "qdq.target": target.key,
            "qdq.tensor": target.tensor,
            "qdq.kind": target.kind,
            "qdq.spec": json.dumps(target.spec.to_dict(), sort_keys=True),
        })
        if target.shared_with is not None:
            q.metadata_props["qdq.shared_with"] = self.plan.root(target.key)
        if target.uses is None:
            for use in list(value.uses()):
                if use.node is not q:
                    use.node.replace_input_with(use.idx, dq_out)
            if value.is_graph_output():
                # The graph output keeps its public name; the float tensor is renamed.
                outputs = self.graph.outputs
                for i, out in enumerate(outputs):
                    if out is value:
                        outputs[i] = dq_out
                name = value.name
                value.name = f"{name}_float"
                dq_out.name = name
                self.values[value.name] = value
        else:
            for node_name, idx in target.uses:
                self.nodes[node_name].replace_input_with(idx, dq_out)
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, [q, dq])
        else:
            first_use = next(iter(dq_out.uses()), None)
            if first_use is not None:
                self.graph.insert_before(first_use.node, [q, dq])
            else:
                self.graph.extend([q, dq])


def insert_qdq(model: ir.Model, plan: QuantPlan, qparams: dict[str, QParams]) -> ir.Model:
    """Insert every planned QDQ pair into ``model`` (in place) and raise the opset as needed."""
    need = required_opset(t.spec for t in plan.targets.values())
    tensors = {t.tensor for t in plan.targets.values()}
    values = [*model.graph.inputs, *model.graph.initializers.values(), *(o for n in model.graph for o in n.outputs)]
    if any(v.dtype in _HALF for v in values if v.name in tensors):
        need = max(need, HALF_OPSET)
    ensure_opset(model, need, blocked=any(t.layout.block_size is not None for t in plan.targets.values()))
    inserter = _Inserter(model, plan, qparams)
    targets = list(plan.targets.values())
    # Pairs read by every consumer first: a consumer-specific pair on the same tensor then
    # rewires just its own consumer, after the shared one.
    for target in [t for t in targets if t.uses is None] + [t for t in targets if t.uses is not None]:
        inserter.insert(target)
    return model
