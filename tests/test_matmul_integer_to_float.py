"""MatMulIntegerToFloatPass: an 8-bit QDQ MatMul with its bias Add / scalar Mul|Div as one onnxruntime kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.backends.host_cpu import u8s8_saturates
from qdq.backends.ort_inspect import optimized_model
from qdq.passes.matmul_integer_to_float import fuse_matmul_integer_to_float
from qdq.passes.weights_to_uint8 import weights_to_uint8

RNG = np.random.default_rng(0)
K, N = 16, 8
W_Q = RNG.integers(-127, 128, (K, N)).astype(np.int8)
W_SCALE = (RNG.random(N) * 0.02 + 0.005).astype(np.float32)
BIAS = RNG.standard_normal(N).astype(np.float32)


def _graph(tail: list[tuple[str, object]], *, per_block: bool = False, extra_reader: bool = False) -> ir.Model:
    """x -> Q -> DQ -> MatMul(DQ(w)) -> tail ops (("Add", bias) / ("Mul", c) / ("Div", c) / ("RDiv", c)) -> y."""
    inits = [numpy_helper.from_array(W_Q, "w_q"), numpy_helper.from_array(np.float32(0.05), "x_scale"),
             numpy_helper.from_array(np.uint8(128), "x_zp"), numpy_helper.from_array(np.zeros(N, np.int8), "w_zp")]
    if per_block:
        inits[1:] = [inits[1], inits[2], numpy_helper.from_array(np.repeat(W_SCALE[None], 2, 0), "w_scale"),
                     numpy_helper.from_array(np.zeros((2, N), np.int8), "w_zp2")]
        w_dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp2"], ["w"], axis=0, block_size=8)
    else:
        inits.append(numpy_helper.from_array(W_SCALE, "w_scale"))
        w_dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1)
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]), w_dq,
             helper.make_node("MatMul", ["xd", "w"], ["t0"], name="mm")]
    outputs = []
    for i, (op, const) in enumerate(tail):
        cname = f"c{i}"
        inits.append(numpy_helper.from_array(np.asarray(const, np.float32), cname))
        ins = [cname, f"t{i}"] if op == "RDiv" else [f"t{i}", cname]
        nodes.append(helper.make_node("Div" if op == "RDiv" else op, ins, [f"t{i + 1}"]))
    last = f"t{len(tail)}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), *outputs], inits)
    return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("tail", [
    [("Add", BIAS)],
    [("Mul", 0.25)],
    [("Div", 8.0)],
    [("Add", BIAS), ("Mul", 0.5)],
    [("Mul", 3.0), ("Add", BIAS), ("Div", 2.0)],
    [("Add", BIAS.reshape(1, 1, N))],
])
@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_fused_kernel_matches_qdq_graph(tail, weights: str) -> None:
    """Exact with uint8 weights (U8U8 kernels) everywhere; with int8 weights (U8S8) where this CPU's kernels do
    not saturate (x86 without VNNI adds product pairs in int16: :mod:`qdq.backends.host_cpu`)."""
    x = RNG.standard_normal((2, 3, K)).astype(np.float32) * 3
    ref = _graph(tail)
    want = _run(ref, x)
    model = _graph(tail)
    if weights == "uint8":
        assert weights_to_uint8(model) == 1
    assert fuse_matmul_integer_to_float(model) == 1
    ops = [n.op_type for n in model.graph]
    assert ops == ["QuantizeLinear", "MatMulIntegerToFloat", "Identity"], ops
    assert model.opset_imports["com.microsoft"] == 1
    assert [v.dtype for v in model.graph.initializers.values() if v.name == "w_q"] == [
        ir.DataType.UINT8 if weights == "uint8" else ir.DataType.INT8]
    got = _run(model, x)
    if weights == "int8" and u8s8_saturates():  # onnxruntime's U8S8 kernel clips here (what "auto" avoids)
        assert not np.allclose(got, want, rtol=1e-5, atol=1e-5)
        return
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1  # not a vacuous comparison


@pytest.mark.parametrize(("tail", "kw"), [
    ([], {}),                                  # nothing to absorb: left to onnxruntime's own fusion
    ([("Add", BIAS[:4].repeat(2))], {"per_block": True}),  # per-block weight: no integer kernel
    ([("Add", BIAS)], {"extra_reader": True}),  # the MatMul output is read twice
    ([("RDiv", 2.0)], {}),                     # c / x is not a rescale
    ([("Add", np.ones((3, N)))], {}),          # not a bias along the output columns
])
def test_pass_leaves_what_it_cannot_fuse(tail, kw) -> None:
    model = _graph(tail, **kw)
    before = [n.op_type for n in model.graph]
    assert fuse_matmul_integer_to_float(model) == 0
    assert [n.op_type for n in model.graph] == before


def test_attention_bias_and_score_scale_live_in_the_integer_kernel(attention_onnx: Path, tmp_path: Path) -> None:
    """Finalized tiny attention: every projection's bias and the 1/sqrt(d) score scale are inputs of
    MatMulIntegerToFloat, so onnxruntime's optimized graph has no float Add/Mul reading an integer MatMul; the
    output matches the prepared QDQ model's."""
    import qdq

    calib = [RNG.standard_normal((4, 8, 16)).astype(np.float32) for _ in range(4)]
    q = qdq.Quantizer(attention_onnx, "int8")
    prepared = q.prepare(calib[0])
    with q.calibration_mode():
        for c in calib:
            prepared(c)
    path = tmp_path / "int8.onnx"
    qdq.save(q.finalize(), path)
    opt = optimized_model(path)
    producer = {o: n.op_type for n in opt.graph.node for o in n.output}
    mitof = [n for n in opt.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(mitof) >= 4 and sum(len(n.input) == 7 and bool(n.input[6]) for n in mitof) == 4  # q, k, v, out biases
    after = [n.op_type for n in opt.graph.node if n.op_type in ("Add", "Mul", "Div")
             and any(producer.get(i) == "MatMulIntegerToFloat" for i in n.input)]
    assert after == [], after  # (the residual Add is inside SkipLayerNormalization)
    x = RNG.standard_normal((3, 8, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ref = qdq.session.make_session(q.qdq_model(), level="none").run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    cos = float(np.sum(got * ref) / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.999


def test_per_layer_compare_still_sees_activations_read_by_the_fused_kernel(attention_onnx: Path, tmp_path: Path) -> None:
    """A QuantizeLinear read only by MatMulIntegerToFloat has no DequantizeLinear; qdq compare --per-layer adds one to
    its session, so every quantized activation of the finalized model is measured."""
    import onnx

    import qdq
    from qdq.validate import compare, find_quantized_activations

    calib = [RNG.standard_normal((4, 8, 16)).astype(np.float32) for _ in range(4)]
    path = tmp_path / "int8.onnx"
    qdq.quantize(attention_onnx, "int8", calib, output=path, progress=False)
    proto = onnx.load(path)
    probes = find_quantized_activations(proto)
    activations = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"
                   and n.input[0] not in {i.name for i in proto.graph.initializer}]
    assert len(probes) == len(activations) and any(p.probe is not None for p in probes)
    report = compare(attention_onnx, path, calib, per_layer=True, progress=False)
    assert len(report.layers) == len(probes)
    assert all(np.isfinite(m.sqnr_db) and m.sqnr_db > 10 for m in report.layers), report.format()
