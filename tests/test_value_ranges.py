"""Value intervals and mask detection (qdq/passes/value_ranges.py) and the placement rules built on them."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qdq.passes.annotate import annotate
from qdq.passes.value_ranges import UNKNOWN, Interval, ValueFacts
from qdq.presets import preset


def _int8_quantized_outputs():
    """The int8 preset with graph outputs quantized (coreai_opt's semantics), so the rules under test show on them."""
    import dataclasses

    return dataclasses.replace(preset("int8"), float_graph_outputs=False)
from qdq.spec import QScheme


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           inits: dict[str, np.ndarray] | None = None) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def _x(name: str = "x", dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, [2, 4])


def _values(model: ir.Model) -> dict[str, ir.Value]:
    out = {v.name: v for v in model.graph.inputs}
    out.update({o.name: o for n in model.graph for o in n.outputs})
    out.update(model.graph.initializers)
    return out


def test_intervals_of_activations_and_range_keeping_ops() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("HardSwish", ["x"], ["hswish"]),
        helper.make_node("Gelu", ["x"], ["gelu"]),
        helper.make_node("Softmax", ["x"], ["soft"]),
        helper.make_node("Tanh", ["x"], ["tanh"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[1]),
        helper.make_node("Concat", ["relu", "soft"], ["cat_pos"], axis=1),
        helper.make_node("Concat", ["relu", "tanh"], ["cat_mixed"], axis=1),
        helper.make_node("Mul", ["hswish", "soft"], ["se"]),
        helper.make_node("Add", ["relu", "x"], ["res"]),
        helper.make_node("Clip", ["x", "lo", "hi"], ["relu6"]),
    ]
    model = _model(nodes, [_x()], ["pool", "cat_pos", "cat_mixed", "se", "res", "relu6", "gelu"],
                   {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)})
    facts, v = ValueFacts(model.graph), _values(model)
    assert facts.interval(v["x"]) == UNKNOWN
    assert facts.interval(v["relu"]) == Interval(0.0, math.inf)
    assert facts.interval(v["pool"]).nonnegative
    assert facts.interval(v["cat_pos"]) == Interval(0.0, math.inf)
    assert facts.interval(v["cat_mixed"]) == Interval(-1.0, math.inf)
    assert facts.interval(v["soft"]) == Interval(0.0, 1.0)
    assert facts.interval(v["se"]) == Interval(-0.375, math.inf)  # x * gate in [0, 1]: still bounded below
    assert facts.interval(v["relu6"]) == Interval(0.0, 6.0)
    assert facts.interval(v["hswish"]).one_sided and facts.interval(v["gelu"]).one_sided
    assert not facts.interval(v["tanh"]).one_sided  # bounded both ways and centred: symmetric is right
    assert not facts.interval(v["res"]).one_sided  # relu + unknown: no known bound


def test_mask_arithmetic_is_detected_and_real_activations_are_not() -> None:
    nodes = [
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask4"]),
        helper.make_node("Sub", ["one", "mask4"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["bias"]),
        helper.make_node("MatMul", ["x", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"]),
        helper.make_node("Mul", ["x", "maskf"], ["pooled_in"]),
    ]
    inits = {"axes": np.array([1], np.int64), "one": np.array(1.0, np.float32),
             "neg": np.array(np.finfo(np.float32).min, np.float32), "w": np.ones((4, 4), np.float32)}
    model = _model(nodes, [_x(), _x("mask", TensorProto.INT64)], ["probs", "pooled_in"], inits)
    facts, v = ValueFacts(model.graph), _values(model)
    assert all(facts.is_mask(v[k]) for k in ("maskf", "mask4", "inv", "bias"))
    assert not any(facts.is_mask(v[k]) for k in ("x", "scores", "masked", "probs", "pooled_in"))
    nodes_by_out = {n.outputs[0].name: n for n in model.graph}
    assert facts.applies_mask(nodes_by_out["masked"])
    assert not facts.applies_mask(nodes_by_out["scores"])

    plan = annotate(model, _int8_quantized_outputs())
    quantized = {t.tensor for t in plan.targets.values()}
    assert not quantized & {"maskf", "mask4", "inv", "bias", "neg", "one", "masked"}
    assert {"x", "pooled_in"} <= quantized  # the real activations still are
    assert "scores" not in quantized  # only the mask Add (float) and Softmax read it: no pair buys an integer kernel
    probs = [t for t in plan.targets.values() if t.tensor == "probs"]
    assert not probs  # Softmax output feeds nothing quantized here


def test_annotate_gives_one_sided_tensors_an_asymmetric_grid() -> None:
    nodes = [
        helper.make_node("Conv", ["x4", "w"], ["c1"]),
        helper.make_node("HardSwish", ["c1"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["gap"]),
        helper.make_node("Conv", ["x4", "w"], ["c2"]),
        helper.make_node("Tanh", ["c2"], ["t"]),
        helper.make_node("Add", ["t", "gap"], ["sum"]),
    ]
    x4 = helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 2, 4, 4])
    model = _model(nodes, [x4], ["sum"], {"w": np.ones((2, 2, 1, 1), np.float32)})
    plan = annotate(model, _int8_quantized_outputs())
    scheme = {t.tensor: t.spec.qscheme for t in plan.targets.values() if t.kind == "activation"}
    assert scheme["h"] is QScheme.ASYMMETRIC  # Conv+HardSwish fused, quantized after the activation
    assert scheme["gap"] is QScheme.ASYMMETRIC  # mean of a one-sided tensor
    assert scheme["x4"] is QScheme.SYMMETRIC  # unknown input range: the spec as written
    assert scheme["t"] is QScheme.SYMMETRIC  # Tanh: centred, bounded both ways
    assert scheme["sum"] is QScheme.ASYMMETRIC  # [-1, 1] + [-0.375, inf): bounded below only
