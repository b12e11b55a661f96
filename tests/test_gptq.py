"""GPTQ as an algorithm pass: its im2col matches onnxruntime's Conv, it beats round-to-nearest on the layer's own
objective, the quantizer stores exactly the codes it chose, and it is usable from Python, YAML and the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import qdq
from qdq import ConfigError, QuantizerConfig
from qdq.algorithms import parse_algorithm
from qdq.algorithms.gptq import gptq_round
from qdq.algorithms.layer_rounding import _Layer
from qdq.numerics import dequantize, quantize
from qdq.presets import preset
from qdq.quantizer import Quantizer
from qdq.session import make_session

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [0, 1, 2, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"group": 4, "strides": [2, 1]},
    {"group": 8, "pads": [1, 1, 1, 1]},  # depthwise
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID"},
])
def test_conv_patches_reproduce_onnxruntime_conv(attrs) -> None:
    """Patches x weight matrix = the Conv's output, so the Hessian is that of the products the Conv computes."""
    group = attrs.get("group", 1)
    w = RNG.standard_normal((8, 8 // group, 3, 3)).astype(np.float32)
    x = RNG.standard_normal((2, 8, 9, 7)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    model = ir.from_proto(proto)
    conv = next(iter(model.graph))
    layer = _Layer(conv, None, conv.inputs[1], conv.inputs[0], group)  # type: ignore[arg-type]
    wm = layer.to_matrix(w)  # [groups, out/group, in/group * 9]
    for i, sample in enumerate(x):
        p = layer._patches(sample)  # [rows, groups, K]
        got = np.einsum("rgk,gok->rgo", p, wm).reshape(want.shape[2], want.shape[3], -1)
        np.testing.assert_allclose(got.transpose(2, 0, 1), want[i], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.from_matrix(wm, w.shape), w)


def _grid(w: np.ndarray, bits: int = 4) -> tuple[np.ndarray, np.ndarray, float, float]:
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=2, keepdims=True) / (qmax + 0.5)
    return np.broadcast_to(scale, w.shape), np.zeros_like(w), -qmax - 1.0, float(qmax)


def test_gptq_beats_round_to_nearest_on_correlated_inputs_and_equals_it_on_white_ones() -> None:
    w = RNG.standard_normal((1, 16, 64))
    mix = RNG.standard_normal((64, 64))
    x = RNG.standard_normal((4096, 64)) @ mix  # correlated inputs
    h = (x.T @ x / len(x))[None]
    scale, zp, qmin, qmax = _grid(w)
    rtn = np.clip(np.rint(w / scale), qmin, qmax)
    for act_order in (True, False):
        codes = gptq_round(w, h, scale, zp, qmin, qmax, act_order=act_order, block=16)
        assert codes.min() >= qmin and codes.max() <= qmax and np.all(codes == np.rint(codes))

        def err(c: np.ndarray) -> float:
            e = w - c * scale
            return float(np.einsum("goi,gij,goj->", e, h, e))
        assert err(codes) < 0.7 * err(rtn), (act_order, err(codes), err(rtn))
    # uncorrelated inputs of equal power: nothing to compensate, GPTQ is round-to-nearest
    codes = gptq_round(w, np.eye(64)[None] * 3.0, scale, zp, qmin, qmax, damp=1e-6)
    np.testing.assert_array_equal(codes, rtn)


def _digits_gptq(digits_onnx: Path, x: np.ndarray, config) -> Quantizer:
    q = Quantizer(digits_onnx, config)
    batches = [x[i:i + 64] for i in range(0, len(x), 64)]
    q.progress = False
    notes = q.apply_algorithms(batches)
    assert any(n.startswith("gptq: 4 weights rounded over") for n in notes), notes
    q.prepare(x[:2])
    q.calibrate(batches, progress=False)
    return q


@pytest.mark.parametrize("weight", [
    {"dtype": "int4", "granularity": {"type": "per_block", "block_size": 8}},
    {"dtype": "int4", "qscheme": "asymmetric", "granularity": {"type": "per_block", "block_size": 8}},
    {"dtype": "int8", "granularity": {"type": "per_channel"}},
    {"dtype": "uint8", "qscheme": "asymmetric", "granularity": {"type": "per_tensor"}},
])
def test_quantizer_stores_the_codes_gptq_chose(digits_onnx, digits_data, weight) -> None:
    """Every rounded weight's float value is already on its pinned grid: quantizing it again changes nothing, so
    the QDQ model's integers are GPTQ's. On held-out digits the weight-only model is closer to FP32 than RTN."""
    x_tr, _, x_te, _ = digits_data
    cfg = {"global_config": {"op_state_spec": {"weight": weight}, "op_input_spec": None, "op_output_spec": None},
           "algorithms": [{"name": "gptq"}], "bias_correction": False}
    q = _digits_gptq(digits_onnx, x_tr[:512], cfg)
    weights = [t for t in q.targets.values() if t.kind == "weight"]
    assert len(weights) == 4
    for t in weights:
        w = q.float_model.graph.initializers[t.tensor].const_value.numpy()
        qp = q.qparams[t.key]
        codes = quantize(w, qp.scale, qp.zero_point, t.spec.dtype, t.layout)
        np.testing.assert_array_equal(dequantize(codes, qp.scale, qp.zero_point, t.layout), w)
    ref = make_session(str(digits_onnx)).run(None, {"x": x_te})[0]

    def sqnr(out: np.ndarray) -> float:
        return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2)))
    rtn = qdq.quantize(digits_onnx, dict(cfg, algorithms=[]), progress=False)
    got = make_session(q.qdq_model()).run(None, {"x": x_te})[0]
    base = make_session(rtn).run(None, {"x": x_te})[0]
    assert sqnr(got) > sqnr(base), (sqnr(got), sqnr(base))


def test_gptq_everywhere_a_user_asks(digits_onnx, digits_data, tmp_path: Path) -> None:
    x = digits_data[0][:256]
    cfg = QuantizerConfig.from_yaml("algorithms:\n  - {name: gptq, damp: 0.05, act_order: false}\n")
    assert cfg.algorithms[0] == {"name": "gptq", "damp": 0.05, "block": 128, "act_order": False, "sequential": False,
                                 "bias_correction": True, "fetch_mb": 128}
    options = parse_algorithm("gptq:act_order=no,block=64,bias_correction=off").options
    assert (options["act_order"], options["block"], options["bias_correction"]) == (False, 64, False)
    with pytest.raises(ConfigError, match="damp must be in"):
        parse_algorithm("gptq:damp=2")
    with pytest.raises(ConfigError, match="act_order must be bool"):
        parse_algorithm("gptq:act_order=maybe")
    with pytest.raises(ConfigError, match="need calibration data"):
        qdq.quantize(digits_onnx, dataclasses.replace(preset("w4"), algorithms=["gptq"]), progress=False)
    np.save(tmp_path / "calib.npy", x)
    from qdq.cli import main

    out = tmp_path / "q.onnx"
    assert main(["quantize", str(digits_onnx), "-o", str(out), "--preset", "w4", "--calib-data",
                 str(tmp_path / "calib.npy"), "--algorithm", "gptq", "--quiet"]) == 0
    assert out.exists()
    assert main(["quantize", str(digits_onnx), "-o", str(tmp_path / "q2.onnx"), "--preset", "w4", "--calib-data",
                 str(tmp_path / "calib.npy"), "--algorithm", "gptq:damp=0", "--quiet"]) == 2
    assert not (tmp_path / "q2.onnx").exists()


def test_pinned_grid_is_dropped_when_the_plan_changes(digits_onnx, digits_data) -> None:
    """Pins hold for the spec they were made for: a plan with another weight spec recomputes the grid."""
    from qdq.calibration.pinned import PinnedCalculator

    x = digits_data[0][:256]
    q = _digits_gptq(digits_onnx, x, dataclasses.replace(preset("w8"), algorithms=["gptq"]))
    assert all(isinstance(q._calculators[t.key], PinnedCalculator) for t in q.targets.values() if t.kind == "weight")
    pinned = dict(q._pinned)
    other = Quantizer(digits_onnx, preset("w4"))
    other._pinned = pinned
    other.prepare(x[:2])
    assert not any(isinstance(c, PinnedCalculator) for c in other._calculators.values())


@pytest.mark.parametrize("sequential", [False, True])
def test_bias_correction_removes_the_mean_output_shift(digits_onnx, digits_data, sequential) -> None:
    """After rounding, the bias absorbs the rounded weights' mean output error on the calibration inputs: for the
    first Conv (its input is the model input, the same for both) the per-channel mean error is zero."""
    x = digits_data[0][:256]
    first = next(n for n in ir.load(digits_onnx).graph if n.op_type == "Conv").outputs[0].name
    ref = make_session(str(digits_onnx), extra_outputs=[first]).run([first], {"x": x})[0]
    shifts = {}
    for bc in (True, False):
        algo = {"name": "gptq", "bias_correction": bc, "sequential": sequential}
        q = _digits_gptq(digits_onnx, x, dataclasses.replace(preset("w4"), algorithms=[algo], bias_correction=False))
        got = make_session(q.float_model, extra_outputs=[first]).run([first], {"x": x})[0]
        shifts[bc] = np.abs((got - ref).mean(axis=(0, 2, 3))).max()
    assert shifts[True] < 1e-4 < shifts[False], shifts
