"""Quantizer end to end: prepare → calibration_mode → fake-quant run → finalize, and its invariants."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import qdq
from qdq import DataError, ModelError, ModuleQuantizerConfig, QuantizationSpec, Quantizer, QuantizerConfig, numerics
from qdq.presets import preset


def _calibrated(path, x, config=None, batch=64):
    q = Quantizer(path, config)
    prepared = q.prepare(x[:8])
    with q.calibration_mode():
        for i in range(0, len(x), batch):
            prepared(x[i:i + batch])
    return q, prepared


def test_digits_w8a8_accuracy_close_to_fp32(digits_onnx, digits_data) -> None:
    x_tr, _, x_te, y_te = digits_data
    ref = qdq.load_model(digits_onnx)
    from qdq.calibration.runner import make_session

    fp32 = make_session(ref).run(None, {"x": x_te})[0]
    _, prepared = _calibrated(digits_onnx, x_tr[:512])
    out = prepared(x_te)
    acc_fp32, acc_q = (fp32.argmax(1) == y_te).mean(), (out.argmax(1) == y_te).mean()
    assert acc_q >= acc_fp32 - 0.01
    assert (out.argmax(1) == fp32.argmax(1)).mean() >= 0.98


def test_one_pair_per_target_and_shared_qparams(digits_onnx, digits_data) -> None:
    q, _ = _calibrated(digits_onnx, digits_data[0][:128])
    model = q.qdq_model()
    qs = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(qs) == len(q.targets)
    by_key = {n.metadata_props["qdq.target"]: n for n in qs}
    shared = by_key["max_pool2d"]
    assert shared.inputs[1] is by_key["relu_1"].inputs[1]  # the same scale Value, not a copy
    assert shared.metadata_props["qdq.shared_with"] == "relu_1"


def test_fake_quant_run_matches_reference_numerics(mlp_onnx) -> None:
    """The prepared model's output equals a numpy re-implementation built from the reference numerics."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    q, prepared = _calibrated(mlp_onnx, x)
    qp = q.qparams
    t = q.targets
    init = q.float_model.graph.initializers

    def fq(v, key):
        return numerics.fake_quantize(v, qp[key].scale, qp[key].zero_point, t[key].spec.dtype, t[key].layout)

    w1, b1 = init["fc1.weight"].const_value.numpy(), init["fc1.bias"].const_value.numpy()
    w2, b2 = init["fc2.weight"].const_value.numpy(), init["fc2.bias"].const_value.numpy()
    h = fq(np.maximum(fq(x, "x") @ fq(w1, "fc1.weight").T + b1, 0), "relu")
    y = fq(h @ fq(w2, "fc2.weight").T + b2, "linear_1")
    np.testing.assert_allclose(prepared(x), y, rtol=1e-5, atol=1e-5 * float(qp["linear_1"].scale))


@pytest.mark.parametrize("spec", [
    {"dtype": "int8"},
    {"dtype": "int8", "qscheme": "symmetric_with_clipping"},
    {"dtype": "uint8", "qscheme": "asymmetric"},
    {"dtype": "int4", "granularity": {"type": "per_block", "block_size": 8}},
])
def test_weight_qparams_equal_coreai_opt(mlp_onnx, spec: dict) -> None:
    torch = pytest.importorskip("torch")
    cao = pytest.importorskip("coreai_opt.quantization")
    from coreai_opt.quantization import spec as cao_spec

    from models.tiny import factory_mlp

    gran = spec.get("granularity", {"type": "per_channel"})
    ours = QuantizationSpec(**{**spec, "granularity": gran})
    theirs_gran = (cao_spec.PerBlockGranularity(block_size=gran["block_size"]) if gran["type"] == "per_block"
                   else cao_spec.PerChannelGranularity())
    theirs = cao_spec.QuantizationSpec(dtype=getattr(torch, spec["dtype"]), qscheme=spec.get("qscheme", "symmetric"),
                                       granularity=theirs_gran)
    model, example = factory_mlp()
    cq = cao.Quantizer(model, cao.QuantizerConfig(global_config=cao.ModuleQuantizerConfig(
        op_state_spec={"weight": theirs}, op_input_spec=None, op_output_spec=None)))
    prepared = cq.prepare(example)
    with cq.calibration_mode():
        prepared(example[0])
    ref = {m.tensor_fqn: m.qparams_calculator for _, m in prepared.named_modules() if hasattr(m, "qparams_calculator")}

    q = Quantizer(mlp_onnx, QuantizerConfig(global_config=ModuleQuantizerConfig(
        op_state_spec={"weight": ours}, op_input_spec=None, op_output_spec=None)))
    q.prepare()
    for name in ("fc1.weight", "fc2.weight"):
        got = q.qparams[name]
        want_scale = ref[name].scale.detach().numpy().reshape(got.scale.shape)
        want_zp = ref[name].zero_point.detach().numpy().reshape(got.zero_point.shape)
        np.testing.assert_allclose(got.scale, want_scale, rtol=1e-6)
        np.testing.assert_array_equal(got.zero_point, want_zp)


def test_example_inputs_seed_then_calibration_replaces(digits_onnx, digits_data) -> None:
    x = digits_data[0]
    q = Quantizer(digits_onnx, preset("int8-global-minmax"))
    prepared = q.prepare(x[:1] * 50)  # a wild example: huge ranges
    seeded = q.qparams["relu"].scale.copy()
    prepared(x[:4])  # runnable right after prepare
    with q.calibration_mode():
        prepared(x[:64])
    calibrated = q.qparams["relu"].scale
    q2, _ = _calibrated(digits_onnx, x[:64], preset("int8-global-minmax"))
    assert calibrated < seeded
    np.testing.assert_array_equal(calibrated, q2.qparams["relu"].scale)


def test_uncalibrated_model_gives_clear_error(digits_onnx, digits_data) -> None:
    q = Quantizer(digits_onnx)
    prepared = q.prepare()
    with pytest.raises(DataError, match="calibration_mode"):
        prepared(digits_data[0][:2])


def test_nan_in_calibration_data_is_rejected(digits_onnx, digits_data) -> None:
    q = Quantizer(digits_onnx)
    prepared = q.prepare()
    x = digits_data[0][:4].copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"), q.calibration_mode():
        prepared(x)


def test_input_model_is_never_modified(digits_onnx, digits_data) -> None:
    model = qdq.load_model(digits_onnx)
    before = [n.op_type for n in model.graph]
    q, _ = _calibrated(model, digits_data[0][:64])
    q.finalize()
    assert [n.op_type for n in model.graph] == before


def test_already_quantized_model_is_rejected(digits_onnx, digits_data) -> None:
    q, _ = _calibrated(digits_onnx, digits_data[0][:64])
    with pytest.raises(ModelError, match=r"already quantized .* qdq\.finalize_model\(model, backend\)"):
        Quantizer(q.qdq_model())
    final = qdq.finalize_model(q.qdq_model(), "onnxruntime")  # the suggested call exists and works
    assert any(n.op_type == "DequantizeLinear" for n in final.graph)


def test_malformed_model_file(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        Quantizer(bad)


def test_opset_is_the_lowest_that_works(digits_onnx, digits_data) -> None:
    x = digits_data[0][:64]
    base = qdq.load_model(digits_onnx).opset_imports[""]
    int8, _ = _calibrated(digits_onnx, x)
    assert int8.qdq_model().opset_imports[""] == base  # exporter's opset already >= 13
    w4 = Quantizer(digits_onnx, preset("w4"))
    w4.prepare()
    assert w4.qdq_model().opset_imports[""] == max(base, 21)


@pytest.mark.parametrize("name", ["int8", "int8-global-minmax", "fp8", "w8", "w4"])
def test_presets_run_in_onnxruntime_after_finalize(name, digits_onnx, digits_data, tmp_path) -> None:
    x_tr, _, x_te, y_te = digits_data
    out = qdq.quantize(digits_onnx, name, [x_tr[i:i + 64] for i in range(0, 256, 64)], progress=False)
    path = qdq.save(out, tmp_path / f"{name}.onnx")
    import onnx

    onnx.checker.check_model(onnx.load(path), full_check=True)
    from qdq.calibration.runner import make_session

    logits = make_session(qdq.load_model(path)).run(None, {"x": x_te})[0]
    assert (logits.argmax(1) == y_te).mean() > 0.9
    if name != "int8-global-minmax":
        fp32_size = digits_onnx.stat().st_size
        assert path.stat().st_size < fp32_size  # weights stored as integers / float8


@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_reduces_error_and_is_exact_mean_shift(model_dir, bias) -> None:
    """A depthwise conv with few taps: weight rounding biases each channel's mean; correction removes it (a conv
    without bias gets one)."""
    import dataclasses

    import torch
    from torch import nn

    from qdq.calibration.runner import make_session
    from qdq.torch_export import export

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias), nn.Conv2d(8, 4, 1, bias=bias)).eval()
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    path = export(net, (torch.randn(2, 8, 12, 12),), model_dir / "dw.onnx")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 8, 12, 12)) + 2.0).astype(np.float32)  # non-zero input means
    ref = make_session(qdq.load_model(path), level="none")
    fp = ref.run(None, {ref.get_inputs()[0].name: x})[0]
    errs = {}
    for on in (False, True):
        cfg = dataclasses.replace(qdq.preset("w4"), bias_correction=on)
        q = Quantizer(path, cfg)
        q.prepare()
        q.calibrate([x[:32], x[32:]], progress=False)
        out = q.run(x)[0]
        errs[on] = float(np.abs((out - fp).mean(axis=(0, 2, 3))).max())  # worst per-channel mean shift
        convs = [n for n in q.qdq_model().graph if n.op_type == "Conv"]
        assert all(len(n.inputs) == 3 for n in convs) == (bias or on)
    assert errs[True] < 0.25 * errs[False], errs


def test_bias_correction_config_round_trip() -> None:
    cfg = QuantizerConfig.from_dict({"bias_correction": True})
    assert cfg.bias_correction and QuantizerConfig.from_yaml(cfg.to_yaml()).bias_correction
    assert not QuantizerConfig().bias_correction
    with pytest.raises(qdq.ConfigError, match="true or false"):
        QuantizerConfig(bias_correction="yes")


def test_weight_only_config_collects_channel_means_only_with_data(digits_onnx, digits_data) -> None:
    """w4 observes no activation, but its bias correction needs the input means: data given -> biases move."""
    q = Quantizer(digits_onnx, preset("w4"))
    assert not q.observes_activations and q.needs_data
    x = digits_data[0][:128]
    with_data = qdq.quantize(digits_onnx, "w4", [x[:64], x[64:]], progress=False)
    without = qdq.quantize(digits_onnx, "w4", progress=False)  # no data: bias correction skipped (warned)

    def biases(model):
        return {n.name: model.graph.initializers[n.inputs[2].name].const_value.numpy()
                for n in model.graph if n.op_type == "Conv" and len(n.inputs) > 2}

    corrected, plain = biases(with_data), biases(without)
    assert corrected.keys() == plain.keys() and corrected
    assert any(not np.array_equal(corrected[k], plain[k]) for k in corrected)


def _untyped_index_math_model():
    """torch.chunk as the legacy exporter writes it: the split point is int64 arithmetic on Shape with untyped
    Constant nodes (no value_info), next to a float Conv."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    i64 = lambda name, v: helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Shape", ["r"], ["shape"]), i64("axis", [1]), i64("zero", [0]), i64("two", [2]),
             i64("one", [1]), helper.make_node("Gather", ["shape", "axis"], ["ch"]),
             helper.make_node("Div", ["ch", "two"], ["half"]), helper.make_node("Mul", ["half", "one"], ["mid"]),
             helper.make_node("Slice", ["r", "zero", "mid", "axis"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "chunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
                               numpy_helper.from_array(rng.normal(0, 0.3, (2, 4, 1, 1)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_untyped_int64_index_math_is_never_quantized(tmp_path) -> None:
    """Untyped values get onnx's inferred type before planning: the int64 Div/Mul feeding Slice stay as they are
    and the written model loads and runs (it used to get int64 QuantizeLinear nodes onnxruntime refuses)."""
    from qdq.metrics import sqnr_db
    from qdq.session import make_session

    proto = _untyped_index_math_model()
    q = Quantizer(proto, "int8")
    planned = {t.tensor for t in q.plan.targets.values()}
    assert not planned & {"ch", "half", "mid", "one", "two"}, planned
    assert {"r", "a"} <= planned  # the float activations still are
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    qdq.quantize(proto, "int8", [x], output=tmp_path / "q.onnx", progress=False)
    got = make_session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    want = make_session(proto).run(None, {"x": x})[0]
    assert got.shape == want.shape == (8, 2, 8, 8)
    assert sqnr_db(want, got) > 25


def test_a_model_onnxruntime_cannot_load_is_never_written(tmp_path, monkeypatch, digits_onnx, digits_data) -> None:
    """The last check before writing: an onnxruntime model that does not load (a qdq bug) is an error, and no
    file appears."""
    import onnx_ir as ir

    real = Quantizer.finalize

    def broken(self, *args, **kwargs):
        model = real(self, *args, **kwargs)
        model.graph.append(ir.node("NoSuchOp", [model.graph.inputs[0]]))  # an op onnxruntime does not know
        return model

    monkeypatch.setattr(Quantizer, "finalize", broken)
    x = digits_data[0][:32]
    with pytest.raises(ModelError, match="does not load in onnxruntime.*nothing was written"):
        qdq.quantize(digits_onnx, "int8", [x], output=tmp_path / "q.onnx", progress=False)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize(("name", "block"), [("int8", None), ("w4", 32)])
def test_batched_matmul_weight_keeps_blocks_and_drops_per_channel(name: str, block: int | None) -> None:
    """A [2, 64, 32] MatMul weight: int4 blocks along its input axis stay (onnxruntime runs them float); a
    per-column int8 scale, which onnxruntime's fused integer MatMul cannot take for a batched weight, becomes one."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.3, (2, 64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, "N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "N", 32])],
                              [numpy_helper.from_array(w, "w")])
    q = Quantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), name)
    (target,) = [t for t in q.plan.targets.values() if t.tensor == "w"]
    assert target.layout.block_size == block
    assert target.layout.axis == (1 if block else None)


def test_blank_calibration_input_is_warned_about(digits_onnx, caplog) -> None:
    """All-zero calibration data calibrates every activation range to nothing: one warning names the input."""
    caplog.set_level(logging.WARNING)  # the CLI tests leave the root logger at ERROR (--quiet)
    q = Quantizer(digits_onnx, "int8")
    q.prepare()
    q.calibrate([np.zeros((8, 1, 8, 8), np.float32)], progress=False)
    assert "holds one value (0) in every sample" in caplog.text
    caplog.clear()
    q.calibrate([np.random.default_rng(0).random((8, 1, 8, 8), np.float32)], progress=False)
    assert "holds one value" not in caplog.text
