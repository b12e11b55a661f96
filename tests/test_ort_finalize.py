"""finalize(ExportBackend.ONNXRuntime): integer weights, int32 bias, uint8 activations, Relu/Clip folded,
and onnxruntime's CPU optimizer turning every quantized Conv / Gemm / Add into an integer kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq import numerics
from qdq.backends import ExportBackend
from qdq.backends.ort_inspect import float_compute_nodes, optimized_op_counts
from qdq.backends.pipelines import finalize_passes
from qdq.model_io import save
from qdq.passes.activations_to_uint8 import ActivationsToUint8Pass
from qdq.passes.fold_activation_clip import FoldActivationClipPass
from qdq.passes.fold_weights import FoldWeightsPass
from qdq.passes.quantize_bias import QuantizeBiasPass
from qdq.quantizer import Quantizer, finalize_model

INT4_BLOCK = {"op_state_spec": {"weight": {"dtype": "int4", "granularity": {"type": "per_block", "block_size": 32}}}}
FP8 = {"op_state_spec": {"weight": {"dtype": "float8_e4m3fn", "granularity": {"type": "per_channel"}}},
       "op_input_spec": {"*": {"dtype": "float8_e4m3fn"}}, "op_output_spec": {"*": {"dtype": "float8_e4m3fn"}}}


def _run(model: ir.Model, feeds: dict[str, np.ndarray], *, level: str = "none",
         outputs: list[str] | None = None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    opts.log_severity_level = 3
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def _calibrated(path: Path, x: np.ndarray, config=None) -> Quantizer:
    q = Quantizer(path, config)
    prepared = q.prepare(x[:2])
    with q.calibration_mode():
        for i in range(0, len(x), 32):
            prepared(x[i:i + 32])
    return q


def _nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op_type]


# ------------------------------------------------------------------ EfficientNet-Lite0


@pytest.fixture(scope="module")
def effnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Quantizer, np.ndarray]:
    pytest.importorskip("efficientnet_lite_pytorch")
    torch = pytest.importorskip("torch")
    from models.efficientnet import factory, imagenet_sample_dir, load_imagenet_sample
    from qdq.torch_export import export

    model, example = factory()
    path = export(model, example, tmp_path_factory.mktemp("effnet") / "effnet.onnx")
    if imagenet_sample_dir() is not None:
        x = np.asarray(load_imagenet_sample("calib", limit=8)[0], np.float32)
    else:  # no image sample: random images still exercise every op
        x = torch.randn(8, 3, 224, 224, generator=torch.manual_seed(0)).numpy()
    return path, _calibrated(path, x), x


def test_effnet_float_logits_keep_an_integer_gemm(effnet, tmp_path) -> None:
    """The presets' float_graph_outputs: no pair on the logits, and onnxruntime still runs the Gemm on integers
    (QGemm with float output); the logits come straight from it, not from a DequantizeLinear."""
    from qdq.presets import preset

    _, _, x = effnet
    q = _calibrated(effnet[0], x, preset("int8"))
    path = save(q.finalize(ExportBackend.ONNXRuntime), tmp_path / "effnet.int8.onnx")
    counts = optimized_op_counts(path)
    assert counts["QGemm"] == 1 and counts["Gemm"] == 0 and counts["QLinearConv"] == 49, counts
    assert float_compute_nodes(path) == []
    model = onnx.load(path)
    (out,) = [n for n in model.graph.node if model.graph.output[0].name in n.output]
    assert out.op_type == "Gemm", out.op_type  # the float-output Gemm onnxruntime fuses into QGemm


def test_effnet_every_conv_add_gemm_is_integer_in_ort(effnet, tmp_path) -> None:
    fp32_path, q, _ = effnet
    final = q.finalize(ExportBackend.ONNXRuntime)
    path = save(final, tmp_path / "effnet.int8.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert path.stat().st_size < 0.3 * fp32_path.stat().st_size

    counts = optimized_op_counts(path)
    assert counts["Conv"] == 0 and counts["FusedConv"] == 0 and counts["Gemm"] == 0 and counts["Add"] == 0, counts
    assert counts["QLinearConv"] == 49
    assert counts["QLinearAdd"] == 9
    assert counts["QGemm"] == 1
    assert float_compute_nodes(path) == []
    # Weights are integer initializers; no QuantizeLinear reads a constant any more.
    assert not any(n.inputs[0].const_value is not None for n in _nodes(final, "QuantizeLinear"))
    # Every Relu6 Clip before a Q is gone or runs on uint8 after the Q.
    for clip in _nodes(final, "Clip"):
        assert clip.inputs[0].producer().op_type == "QuantizeLinear"
        assert all(v.dtype == ir.DataType.UINT8 for v in clip.inputs[1:] if v is not None)


def test_effnet_uint8_switch_changes_no_dequantized_value(effnet) -> None:
    _, q, x = effnet
    prepared = q.qdq_model()
    converted = q.qdq_model()
    assert ActivationsToUint8Pass()(converted).modified
    dq_names = [n.outputs[0].name for n in _nodes(converted, "DequantizeLinear")
                if n.inputs[2] is not None and n.inputs[2].dtype == ir.DataType.UINT8]
    assert len(dq_names) > 50
    assert not any(n.inputs[2].dtype == ir.DataType.INT8 for n in _nodes(converted, "QuantizeLinear")
                   if n.metadata_props.get("qdq.kind") == "activation")
    for m in (prepared, converted):
        for name in dq_names:
            value = next(n.outputs[0] for n in m.graph if n.outputs and n.outputs[0].name == name)
            if not value.is_graph_output():
                m.graph.outputs.append(value)
    feeds = {q.input_names[0]: x[:2]}
    names = [q.output_names[0], *dq_names]
    for a, b in zip(_run(prepared, feeds, outputs=names), _run(converted, feeds, outputs=names), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ------------------------------------------------------------------ weight folding


def _weight_dq_outputs(model: ir.Model) -> list[str]:
    return [n.outputs[0].name for n in _nodes(model, "DequantizeLinear")
            if n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "QuantizeLinear"
            and n.inputs[0].producer().inputs[0].const_value is not None]


@pytest.mark.parametrize("config, dtype", [
    (None, ir.DataType.INT8),
    ({"global_config": INT4_BLOCK}, ir.DataType.INT4),
    ({"global_config": FP8}, ir.DataType.FLOAT8E4M3FN),
])
def test_fold_weights_is_bit_exact(mlp_onnx, config, dtype) -> None:
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    q = _calibrated(mlp_onnx, x, config)
    prepared = q.qdq_model()
    names = _weight_dq_outputs(prepared)
    assert len(names) == 2
    if dtype == ir.DataType.INT4:
        assert all(n.attributes.get_int("block_size", 0) == 32 for n in _nodes(prepared, "DequantizeLinear")
                   if n.outputs[0].name in names)
    folded = q.qdq_model()
    assert FoldWeightsPass()(folded).modified
    float_weights = {n.inputs[0].name for n in _nodes(prepared, "QuantizeLinear") if n.inputs[0].const_value is not None}
    assert not float_weights & set(folded.graph.initializers)  # float copies dropped
    for name in names:
        dq = next(n for n in folded.graph if n.outputs and n.outputs[0].name == name)
        assert dq.inputs[0].is_initializer() and dq.inputs[0].const_value.dtype == dtype
    for m in (prepared, folded):
        for name in names:
            m.graph.outputs.append(next(n.outputs[0] for n in m.graph if n.outputs and n.outputs[0].name == name))
    a = _run(prepared, {"x": x}, outputs=names)
    b = _run(folded, {"x": x}, outputs=names)
    for wa, wb in zip(a, b, strict=True):
        assert np.array_equal(wa.view(np.uint32), wb.view(np.uint32))


def test_fold_weights_matches_reference_quantize(digits_onnx, digits_data) -> None:
    q = _calibrated(digits_onnx, digits_data[0][:64])
    prepared, folded = q.qdq_model(), q.qdq_model()
    FoldWeightsPass()(folded)
    for qn in _nodes(prepared, "QuantizeLinear"):
        w = qn.inputs[0].const_value
        if w is None:
            continue
        scale, zp = qn.inputs[1].const_value.numpy(), qn.inputs[2].const_value.numpy()
        from qdq.layout import QLayout

        ref = numerics.quantize(w.numpy(), scale, zp, np.int8, QLayout(axis=qn.attributes.get_int("axis", 1)))
        got = folded.graph.initializers[qn.outputs[0].name].const_value.numpy()
        assert got.dtype == np.int8 and np.array_equal(got, ref)


# ------------------------------------------------------------------ bias


def test_bias_is_int32_with_input_times_weight_scale(digits_onnx, digits_data) -> None:
    q = _calibrated(digits_onnx, digits_data[0][:64])
    prepared = q.qdq_model()
    final = q.finalize(ExportBackend.ONNXRuntime)
    float_bias = {n.name: n.inputs[2].const_value.numpy() for n in prepared.graph
                  if n.op_type in ("Conv", "Gemm") and len(n.inputs) > 2}
    assert len(float_bias) == 4
    for node in final.graph:
        if node.name not in float_bias:
            continue
        b = float_bias[node.name]
        dq = node.inputs[2].producer()
        assert dq.op_type == "DequantizeLinear"
        b_q, b_scale, b_zp = (v.const_value.numpy() for v in dq.inputs)
        assert b_q.dtype == np.int32 and b_zp.dtype == np.int32 and not b_zp.any()
        x_scale = node.inputs[0].producer().inputs[1].const_value.numpy()
        w_scale = node.inputs[1].producer().inputs[1].const_value.numpy()
        assert np.array_equal(b_scale, (x_scale * w_scale).astype(np.float32))
        assert b_scale.shape == b.shape and dq.attributes.get_int("axis", 1) == 0  # per output channel
        assert np.array_equal(b_q, np.rint(b / b_scale).astype(np.int32))
        assert np.abs(b_q * b_scale - b).max() <= b_scale.max() / 2 + 1e-7


@pytest.mark.parametrize("config", [{"global_config": FP8}, {"global_config": INT4_BLOCK}],
                         ids=["fp8-activations", "int4-weights"])
def test_bias_pass_does_not_fire(mlp_onnx, config) -> None:
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    q = _calibrated(mlp_onnx, x, config)
    model = q.qdq_model()
    FoldWeightsPass()(model)
    assert not QuantizeBiasPass()(model).modified
    final = q.finalize(ExportBackend.ONNXRuntime)
    for gemm in _nodes(final, "Gemm"):
        assert gemm.inputs[2].const_value is not None and gemm.inputs[2].dtype == ir.DataType.FLOAT
    assert not any(v.const_value.dtype == ir.DataType.INT32 for v in final.graph.initializers.values())


# ------------------------------------------------------------------ Relu / Clip before Q


def _conv_clip_q(scale: float, zp: int, lo: float | None, hi: float | None, op: str = "Clip") -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> Conv (int8 weight DQ) -> Relu/Clip -> Q(scale, zp) -> DQ -> y."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w_scale = np.abs(w).max() / 127
    inits = [numpy_helper.from_array(numerics.quantize(w, w_scale, 0, np.int8), "w_q"),
             numpy_helper.from_array(np.array(w_scale, np.float32), "w_s"),
             numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_s"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
             numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zp, np.uint8), "zp")]
    act_inputs = ["c"]
    if op == "Clip":
        for name, v in (("lo", lo), ("hi", hi)):
            if v is None:
                act_inputs.append("")
            else:
                inits.append(numpy_helper.from_array(np.array(v, np.float32), name))
                act_inputs.append(name)
    q = helper.make_node("QuantizeLinear", ["a", "s", "zp"], ["a_q"], name="a_Q")
    q.metadata_props.add(key="qdq.kind", value="activation")
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="x_DQ"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w_dq"], name="w_DQ"),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node(op, act_inputs, ["a"], name="act"), q,
             helper.make_node("DequantizeLinear", ["a_q", "s", "zp"], ["y"], name="a_DQ")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("scale, zp, lo, hi, op, expect", [
    (6 / 255, 0, 0.0, 6.0, "Clip", "dropped"),        # Relu6, range calibrated on [0, 6]
    (12 / 255, 128, 0.0, 6.0, "Clip", "moved"),       # symmetric Q after Relu6: negative codes unused
    (10 / 255, 0, 0.0, 6.0, "Clip", "moved"),         # Q range reaches 10 > 6: the 6 must stay
    (0.05, 0, None, None, "Relu", "dropped"),         # Relu, zero point at qmin
    (0.05, 100, None, None, "Relu", "moved"),         # symmetric-ish Q after Relu
])
def test_activation_before_q_is_folded_exactly(scale, zp, lo, hi, op, expect) -> None:
    proto = _conv_clip_q(scale, zp, lo, hi, op)
    model = ir.serde.deserialize_model(proto)
    folded = ir.serde.deserialize_model(proto)
    assert FoldActivationClipPass()(folded).modified
    ops = [n.op_type for n in folded.graph if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    conv_q = next(n for n in folded.graph if n.op_type == "QuantizeLinear" and n.name == "a_Q")
    assert conv_q.inputs[0].producer().op_type == "Conv"
    if expect == "dropped":
        assert ops == ["Conv"]
    else:
        assert ops == ["Conv", "Clip"]
        clip = _nodes(folded, "Clip")[0]
        assert clip.inputs[0].producer() is conv_q
        bounds = [v.const_value.numpy() for v in clip.inputs[1:] if v is not None]
        assert bounds and all(b.dtype == np.uint8 for b in bounds)
        if scale == 10 / 255:
            assert clip.inputs[1] is None and int(bounds[0]) == 153  # Q(6) = round(6 / (10 / 255))
        # Left alone, onnxruntime cannot drop this activation and runs the Conv in float.
        before = optimized_op_counts(model)
        assert before["QLinearConv"] == 0 and before["Conv"] + before["FusedConv"] == 1, before
    after = optimized_op_counts(folded)
    assert after["QLinearConv"] == 1 and after["Conv"] + after["FusedConv"] == 0, after
    x = (np.random.default_rng(2).standard_normal((2, 3, 8, 8)) * 3).astype(np.float32)
    assert np.array_equal(_run(model, {"x": x})[0], _run(folded, {"x": x})[0])  # exact


# ------------------------------------------------------------------ end to end


def test_digits_finalized_accuracy_and_integer_kernels(digits_onnx, digits_data, tmp_path) -> None:
    x_tr, _, x_te, y_te = digits_data
    q = _calibrated(digits_onnx, x_tr[:256])
    acc_prepared = (q.run(x_te)[0].argmax(1) == y_te).mean()
    final = finalize_model(q.qdq_model(), "onnxruntime")
    acc_final = (_run(final, {"x": x_te}, level="all")[0].argmax(1) == y_te).mean()
    assert abs(acc_final - acc_prepared) <= 0.01, (acc_prepared, acc_final)
    counts = optimized_op_counts(final)
    assert counts["QLinearConv"] == 3 and counts["QLinearAdd"] == 1 and counts["QGemm"] == 1, counts
    assert float_compute_nodes(final) == []
    # metadata: qdq keys kept on activation Q nodes only, exporter debug info gone
    for node in final.graph:
        keys = set(node.metadata_props)
        if node.op_type == "QuantizeLinear":
            assert {"qdq.target", "qdq.kind", "qdq.spec"} <= keys
        else:
            assert not any(k.startswith(("qdq.", "pkg.torch.")) for k in keys), (node.name, keys)


def test_apple_backends_have_no_onnx_passes(digits_onnx, digits_data) -> None:
    """Core ML / Core AI read torch programs (qdq.backends.artifact), not a rewritten ONNX graph."""
    assert finalize_passes(ExportBackend.CoreML) == [] and finalize_passes(ExportBackend.CoreAI) == []
    q = _calibrated(digits_onnx, digits_data[0][:64])
    before = q.qdq_model()
    final = q.finalize(ExportBackend.CoreAI)
    assert type(final).__name__ == "BackendArtifact" and final.exported_program is not None
    # the prepared model is not modified; the artifact's ONNX copy has the same Q/DQ pairs
    assert len(_nodes(q.qdq_model(), "QuantizeLinear")) == len(_nodes(before, "QuantizeLinear"))
    assert len(_nodes(final.onnx_model, "QuantizeLinear")) == len(_nodes(before, "QuantizeLinear"))

# ------------------------------------------------------------------ transformers


def test_attention_runs_on_integer_kernels_and_w4_on_matmulnbits(attention_onnx: Path, tmp_path: Path) -> None:
    """int8: every MatMul of a self-attention block (projections, Q·Kᵀ, attention·V) is an integer kernel in
    onnxruntime's optimized graph; w4: the weight MatMuls are MatMulNBits (4-bit weights stay packed)."""
    import qdq
    from qdq.presets import preset

    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, 8, 16)).astype(np.float32) for _ in range(4)]
    int8 = qdq.quantize(attention_onnx, "int8", calib, output=tmp_path / "int8.onnx", progress=False)
    counts = optimized_op_counts(tmp_path / "int8.onnx")
    matmuls = sum(1 for n in ir.load(attention_onnx).graph if n.op_type == "MatMul")
    assert counts["MatMulIntegerToFloat"] + counts["QLinearMatMul"] == matmuls == 6, counts
    assert counts["MatMul"] == counts["FusedMatMul"] == 0
    assert int8 is not None
    w4 = preset("w4").to_dict()
    w4["global_config"]["op_state_spec"]["weight"]["granularity"] = {"type": "per_block", "block_size": 16}
    qdq.quantize(attention_onnx, w4, calib, output=tmp_path / "w4.onnx", progress=False)
    counts = optimized_op_counts(tmp_path / "w4.onnx")
    assert counts["MatMulNBits"] == 4, counts  # q, k, v and output projections
    assert (tmp_path / "w4.onnx").stat().st_size < 0.5 * Path(attention_onnx).stat().st_size


def test_prepared_fp8_model_loads_at_every_optimization_level(tmp_path: Path, caplog) -> None:
    """onnxruntime 1.32's ClipQuantFusion rejects float8 zero points on a prepared (not finalized) fp8 QDQ model with
    a Clip (ReLU6) before a Q at level "all"; make_session then runs it unoptimized, with one warning."""
    import logging

    import torch

    from qdq.session import make_session
    from qdq.torch_export import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU6(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(8, 3, 12, 12).numpy()
    path = export(net, (torch.from_numpy(x[:2]),), tmp_path / "relu6.onnx")
    q = Quantizer(path, "fp8")
    q.prepare(x)
    q.calibrate([x], progress=False)
    prepared = q.qdq_model()
    ref = make_session(prepared, level="none").run(None, {q.input_names[0]: x})[0]
    with caplog.at_level(logging.WARNING, logger="qdq.session"):
        out = make_session(prepared, level="all").run(None, {q.input_names[0]: x})[0]
    if "graph optimizer failed" in caplog.text:
        np.testing.assert_array_equal(out, ref)  # the same graph, unoptimized
    else:  # an onnxruntime that loads it optimized: still the same model
        np.testing.assert_allclose(out, ref, rtol=0.1, atol=0.1 * float(np.abs(ref).max()))


def test_prepared_fp8_model_runs_right_at_the_default_level(digits_onnx, digits_data) -> None:
    """onnxruntime's extended QDQ fusions mis-run float8 activation pairs of a prepared (not finalized) model
    (digits: -6.8 dB, 10 % agreement); qdq's sessions run such a model at level basic, so compare on a prepared fp8
    model gives the numbers of the reference (level none) run."""
    from qdq.validate import compare

    x_tr, _, x_te, _ = digits_data
    q = _calibrated(digits_onnx, x_tr[:256], "fp8")
    prepared = q.qdq_model()
    default = compare(digits_onnx, prepared, x_te[:128], progress=False).outputs[0]
    exact = compare(digits_onnx, prepared, x_te[:128], progress=False, optimization="none").outputs[0]
    assert default.sqnr_db == pytest.approx(exact.sqnr_db, abs=0.2) and default.sqnr_db > 15
    assert default.top1_agreement is not None and default.top1_agreement > 0.95


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2])
def test_fp8_cast_form_of_a_float16_tensor_equals_onnxruntime_qdq(dtype: int) -> None:
    """A float16 activation's float8 Q->DQ pair becomes casts computed in float32 and cast back: a model
    onnxruntime loads (the float32 form bound Mul to float and float16) and, bit for bit, the pair it replaced
    (onnxruntime divides float16 inputs in float32); saturation included."""
    from qdq.passes.fp8_activations_as_casts import Fp8ActivationsAsCastsPass

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Relu", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N"])],
                              [numpy_helper.from_array(np.array(0.0123, np.float16), "s"),
                               helper.make_tensor("z", dtype, [], [0])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.random.default_rng(0).normal(0, 3, 20000).astype(np.float16)  # |x / s| up to ~1000: saturates
    model = ir.serde.deserialize_model(proto)
    assert Fp8ActivationsAsCastsPass()(model).modified
    assert not _nodes(model, "QuantizeLinear") and _nodes(model, "Cast")
    (want,) = _run(ir.serde.deserialize_model(proto), {"x": x})
    (got,) = _run(model, {"x": x})
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)
    from qdq.passes.fp8_activations_as_casts import restore_fp8_pairs

    assert restore_fp8_pairs(model) == 1  # the analysis view (qdq report): the pair again, casts gone
    assert [n.op_type for n in model.graph] == ["QuantizeLinear", "DequantizeLinear", "Relu"]
    (back,) = _run(model, {"x": x})
    np.testing.assert_array_equal(back, want)


def test_fp8_preset_on_a_float16_model_loads_and_matches_the_prepared_model() -> None:
    from qdq.metrics import sqnr_db
    from qdq.session import make_session

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float16), "b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float16), "w2")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4, 8, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float16)
    q = Quantizer(proto, "fp8")
    q.prepare()
    q.calibrate([x[:8], x[8:]], progress=False)
    prepared = make_session(q.qdq_model(), level="none").run(None, {"x": x})[0]
    final = make_session(q.finalize(), level="all").run(None, {"x": x})[0]
    assert final.dtype == np.float16
    # onnxruntime rounds a float16 Conv's output differently next to casts; the float8 steps are the same
    assert sqnr_db(prepared.astype(np.float32), final.astype(np.float32)) > 35


def test_fp8_cast_form_keeps_every_reader_of_a_shared_pair() -> None:
    """One float8 QuantizeLinear read by two DequantizeLinear nodes, both graph outputs: each output keeps its
    name and value (the second one used to take the first one's name)."""
    from qdq.passes.fp8_activations_as_casts import Fp8ActivationsAsCastsPass

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d1"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d2"]), helper.make_node("Relu", ["d2"], ["n"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N"]) for n in ("d1", "d2", "n")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])], outputs,
                              [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                               helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.random.default_rng(0).normal(0, 3, 1000).astype(np.float32)
    want = _run(ir.serde.deserialize_model(proto), {"x": x})
    model = ir.serde.deserialize_model(proto)
    assert Fp8ActivationsAsCastsPass()(model).modified
    assert [o.name for o in model.graph.outputs] == ["d1", "d2", "n"] and not _nodes(model, "DequantizeLinear")
    for a, b in zip(want, _run(model, {"x": x})):
        np.testing.assert_array_equal(a, b)
