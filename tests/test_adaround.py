"""AdaRound: learned rounding beats round-to-nearest on the layer objective and end to end, from every front end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import qdq
from qdq import ConfigError
from qdq.algorithms import parse_algorithm
from qdq.algorithms.adaround import adaround_round
from qdq.numerics import dequantize, quantize
from qdq.presets import preset
from qdq.quantizer import Quantizer
from qdq.session import make_session


@pytest.mark.parametrize("bits", [4, 8])
def test_learned_rounding_beats_nearest_on_correlated_inputs(bits: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 16, 48))
    x = rng.standard_normal((4096, 48)) @ (np.eye(48) + 0.4 * rng.standard_normal((48, 48)))
    h = np.stack([x.T @ x / len(x)] * 2)
    qmax = 2 ** (bits - 1) - 1
    s = np.broadcast_to(np.abs(w).max(2, keepdims=True) / (qmax + 0.5), w.shape)
    z = np.zeros_like(w)
    codes = adaround_round(w, h, s, z, -qmax - 1.0, float(qmax), iters=300)
    rtn = np.clip(np.rint(w / s), -qmax - 1, qmax)
    assert np.all(codes == np.rint(codes)) and codes.min() >= -qmax - 1 and codes.max() <= qmax
    assert np.all(np.abs(codes - w / s) < 1.0 + 1e-9)  # only ever floor or ceil

    def err(c: np.ndarray) -> float:
        e = w - c * s
        return float(np.einsum("goi,gij,goj->", e, h, e))
    assert err(codes) < 0.7 * err(rtn), (err(codes), err(rtn))


def test_adaround_end_to_end_on_digits(digits_onnx, digits_data) -> None:
    x_tr, _, x_te, _ = digits_data
    cfg = dataclasses.replace(preset("w4"), algorithms=[{"name": "adaround", "iters": 200}], bias_correction=False)
    q = Quantizer(digits_onnx, cfg)
    q.progress = False
    notes = q.apply_algorithms([x_tr[i:i + 64] for i in range(0, 512, 64)])
    assert notes[0].startswith("adaround: 4 weights rounded")
    q.prepare()
    for t in (t for t in q.targets.values() if t.kind == "weight"):  # the stored integers are AdaRound's
        w = q.float_model.graph.initializers[t.tensor].const_value.numpy()
        qp = q.qparams[t.key]
        np.testing.assert_array_equal(dequantize(quantize(w, qp.scale, qp.zero_point, t.spec.dtype, t.layout),
                                                 qp.scale, qp.zero_point, t.layout), w)
    ref = make_session(str(digits_onnx)).run(None, {"x": x_te})[0]
    rtn = make_session(qdq.quantize(digits_onnx, dataclasses.replace(cfg, algorithms=[]), progress=False)).run(
        None, {"x": x_te})[0]
    got = make_session(q.qdq_model()).run(None, {"x": x_te})[0]

    def sqnr(o: np.ndarray) -> float:
        return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - o) ** 2)))
    assert sqnr(got) > sqnr(rtn) + 1.0, (sqnr(got), sqnr(rtn))


def test_adaround_options() -> None:
    assert parse_algorithm("adaround:iters=50,reg=1").options["iters"] == 50
    with pytest.raises(ConfigError, match="lr must be in"):
        parse_algorithm("adaround:lr=3")
    with pytest.raises(ConfigError, match="iters must be"):
        parse_algorithm("adaround:iters=0")


def _calibrated_with_adaround(path, x_tr: np.ndarray) -> Quantizer:
    """A calibrated int8 quantizer of ``path`` whose weights AdaRound (50 iterations) rounded."""
    q = Quantizer(path, dataclasses.replace(preset("int8"), algorithms=[{"name": "adaround", "iters": 50}]))
    q.progress = False
    q.apply_algorithms([x_tr[i:i + 64] for i in range(0, 256, 64)])
    q.prepare()
    q.calibrate([x_tr[:256]], progress=False)
    return q


def test_replan_gives_a_layer_left_float_its_weights_before_rounding(digits_onnx, digits_data) -> None:
    """A fallback candidate that leaves a rounded layer float runs it with its original weight and bias (what
    the rebuilt model from the fallback YAML has), and the quantizer it was replanned from keeps its rounding."""
    import onnx

    from qdq.fallback import _with_float_ops

    x_tr = digits_data[0]
    original = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(digits_onnx)).graph.initializer}
    q = _calibrated_with_adaround(digits_onnx, x_tr)
    conv = next(n for n in q.float_model.graph if n.op_type == "Conv")
    names = [v.name for v in conv.inputs[1:] if v is not None]
    assert any(not np.array_equal(q.float_model.graph.initializers[n].const_value.numpy(), original[n])
               for n in names)  # AdaRound moved the weight (and bias correction the bias)
    new = q.replan(_with_float_ops(q.config, [conv.name]))
    for n in names:
        np.testing.assert_array_equal(new.float_model.graph.initializers[n].const_value.numpy(), original[n])
    assert not np.array_equal(q.float_model.graph.initializers[names[0]].const_value.numpy(), original[names[0]])
    other = next(n for n in new.float_model.graph if n.op_type in ("Conv", "Gemm", "MatMul") and n.name != conv.name)
    w = other.inputs[1].name
    np.testing.assert_array_equal(new.float_model.graph.initializers[w].const_value.numpy(),
                                  q.float_model.graph.initializers[w].const_value.numpy())  # still rounded


@pytest.mark.parametrize("algorithm", ["gptq", "adaround"])
def test_rounding_runs_a_static_batch_model_in_chunks(algorithm: str, tmp_path) -> None:
    """A model whose batch is fixed at 1 is fed 8-sample calibration batches: the rounding statistics run them in
    chunks of its batch (onnxruntime refused the whole batch)."""
    from models.zoo import ZOO

    zoo = ZOO["static_cnn"]
    path = zoo.export(tmp_path / "static.onnx")
    data = [zoo.data(8, i) for i in range(3)]
    q = Quantizer(path, dataclasses.replace(preset("int8"), algorithms=[{"name": algorithm, "iters": 20}]
                                            if algorithm == "adaround" else [{"name": algorithm}]))
    q.progress = False
    notes = q.apply_algorithms(lambda: iter(data))
    assert notes and notes[-1].startswith(f"{algorithm}: ") and "weights rounded over 3 batches" in notes[-1]


def test_fallback_measures_against_the_float_model_before_rounding(digits_onnx, digits_data) -> None:
    """The fallback search's reference is the model before AdaRound moved its weights: leaving every op float
    reproduces it exactly (it was measured against the rounded float model, so that candidate looked 25 dB off)."""
    from qdq.fallback import _Evaluator, _with_float_ops, quantized_ops

    x_tr = digits_data[0]
    q = _calibrated_with_adaround(digits_onnx, x_tr)
    evaluate = _Evaluator(q, [{"x": x_tr[:128]}], "sqnr")
    fp32 = make_session(str(digits_onnx)).run(None, {"x": x_tr[:128]})[0]
    np.testing.assert_array_equal(evaluate.ref, fp32)
    assert evaluate(q.replan(_with_float_ops(q.config, quantized_ops(q))))[0] == np.inf
