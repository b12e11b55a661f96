"""qdq.validate: output and per-layer SQNR, top-1 agreement and accuracy vs numpy, on tiny QDQ models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.data import open_data
from qdq.errors import DataError, ModelError
from qdq.validate import (
    compare,
    find_quantized_activations,
    input_shapes,
    run_model,
    sqnr_db,
)

RNG = np.random.default_rng(0)
W = RNG.normal(size=(4, 3)).astype(np.float32)
SX, SM, SW = np.float32(0.05), np.float32(0.1), np.float32(0.02)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], batch: int | str = "N") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def fp32_model(batch: int | str = "N") -> onnx.ModelProto:
    """y = Relu(x @ W)."""
    return _model([helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
                   helper.make_node("Relu", ["m"], ["y"], name="relu")],
                  [numpy_helper.from_array(W, "W")], batch)


def _qdq(x: str, scale: str, zp: str, name: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [x, scale, zp], [f"{x}_q"], name=name),
            helper.make_node("DequantizeLinear", [f"{x}_q", scale, zp], [f"{x}_dq"], name=f"{name}_dq")]


def quant_model(batch: int | str = "N") -> onnx.ModelProto:
    """The FP32 model with int8 Q/DQ on input x, activation m and (as a constant, not a layer) weight W."""
    inits = [numpy_helper.from_array(W, "W")]
    for n, s in (("sx", SX), ("sm", SM), ("sw", SW)):
        inits += [numpy_helper.from_array(np.array(s, np.float32), n),
                  numpy_helper.from_array(np.array(0, np.int8), n.replace("s", "z"))]
    nodes = [*_qdq("x", "sx", "zx", "q_x"), *_qdq("W", "sw", "zw", "q_W"),
             helper.make_node("MatMul", ["x_dq", "W_dq"], ["m"], name="mm"),
             *_qdq("m", "sm", "zm", "q_m"),
             helper.make_node("Relu", ["m_dq"], ["y"], name="relu")]
    return _model(nodes, inits, batch)


def fq(x: np.ndarray, s: np.float32) -> np.ndarray:
    """int8 fake quantization, round half to even like QuantizeLinear."""
    return (np.clip(np.round(x / s), -128, 127) * s).astype(np.float32)


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    m = x @ W
    mq = fq(fq(x, SX) @ fq(W, SW), SM)
    return {"m": m, "y": np.maximum(m, 0), "mq": mq, "yq": np.maximum(mq, 0)}


def manual_sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    r, t = ref.astype(np.float64), test.astype(np.float64)
    return 10 * math.log10(np.sum(r**2) / np.sum((r - t) ** 2))


@pytest.fixture()
def xs() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(37, 4)).astype(np.float32)


@pytest.fixture()
def npy(tmp_path: Path, xs: np.ndarray) -> Path:
    np.save(tmp_path / "x.npy", xs)
    return tmp_path / "x.npy"


def test_sqnr_db() -> None:
    a = np.array([3.0, 4.0])
    assert sqnr_db(a, a) == math.inf
    assert sqnr_db(a, a + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert sqnr_db(np.zeros(2), np.ones(2)) == -math.inf


def test_expected_agreement_pairs_every_margin_with_every_error() -> None:
    """Two classes: a row keeps its top-1 under error j when margin_i + (error_j[c_i] - error_j[other]) > 0; the
    estimate is the mean over all (i, j). A lone near-tie flipped by its own error costs the count a whole sample
    but the estimate only that tie's share."""
    from qdq.metrics import expected_agreement

    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (40, 2)).astype(np.float32)
    test = ref + rng.normal(0, 0.3, ref.shape).astype(np.float32)
    c = ref.argmax(-1)
    margin = ref[np.arange(40), c] - ref[np.arange(40), 1 - c]
    err = test - ref
    want = np.mean([[margin[i] + err[j, c[i]] - err[j, 1 - c[i]] > 0 for j in range(40)] for i in range(40)]) * 100
    assert expected_agreement(ref, test, chunk=7) == pytest.approx(want)
    assert expected_agreement(ref, ref) == 100.0
    wide = np.tile(np.array([[0.0, 5.0]], np.float32), (100, 1))
    wide[0] = [2.0, 2.001]  # one near-tie, flipped by a tiny error of its own
    noisy = wide.copy()
    noisy[0] = [2.002, 2.001]
    assert np.mean(noisy.argmax(-1) == wide.argmax(-1)) == 0.99
    assert expected_agreement(wide, noisy) == pytest.approx(100 * (1 - 1 / 100 / 100))
    assert expected_agreement(ref, test, max_errors=10) == pytest.approx(want, abs=8)


def test_agreement_interval_is_the_poisson_binomial_of_the_flip_probabilities() -> None:
    """Each sample flips with its own probability: the interval's ends are the quantiles of the flip count,
    checked against a Monte Carlo draw; certain outcomes give a point."""
    from qdq.metrics import agreement_interval, flip_probabilities

    rng = np.random.default_rng(3)
    p = np.concatenate([np.zeros(180), rng.uniform(0.0, 0.6, 20)])
    draws = (rng.random((20000, len(p))) < p).sum(axis=1)
    lo, hi = agreement_interval(p, level=0.9)
    want_hi = 100 * (len(p) - np.quantile(draws, 0.05, method="inverted_cdf")) / len(p)
    want_lo = 100 * (len(p) - np.quantile(draws, 0.95, method="inverted_cdf")) / len(p)
    assert lo <= hi
    assert lo == pytest.approx(want_lo, abs=0.5 + 1e-9) and hi == pytest.approx(want_hi, abs=0.5 + 1e-9)
    assert agreement_interval(np.zeros(50)) == (100.0, 100.0)
    assert agreement_interval(np.ones(4)) == (0.0, 0.0)
    assert agreement_interval(np.full(2, 0.5), level=0.5) == (50.0, 100.0)  # flips: 0 (1/4), 1 (1/2), 2 (1/4)
    ref = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 0.001]], np.float32)
    test = ref + np.array([[0.0, 0.0], [0.0, 0.0], [0.002, 0.0]], np.float32)  # only the near-tie's own error flips
    np.testing.assert_allclose(flip_probabilities(ref, test), [0.0, 0.0, 1 / 3])


def test_compare_reports_expected_agreement_for_class_scores(npy: Path, xs: np.ndarray, tmp_path: Path) -> None:
    from qdq.metrics import agreement_interval, flip_probabilities

    onnx.save(fp32_model(), tmp_path / "fp.onnx")
    report = compare(tmp_path / "fp.onnx", quant_model(), open_data(npy, ["x"]), batch_size=8, progress=False,
                     optimization="disabled")
    (out,) = report.outputs
    want = reference(xs)
    flips = flip_probabilities(want["y"], want["yq"])
    assert out.expected_agreement == pytest.approx(1 - flips.mean(), abs=1e-6)
    lo, hi = agreement_interval(flips)
    assert out.agreement_range == pytest.approx((lo / 100, hi / 100))
    assert out.agreement_range[0] <= out.expected_agreement <= out.agreement_range[1]
    assert f"{100 * out.expected_agreement:.2f} % ({lo:.2f}-{hi:.2f})" in report.format()


def test_output_metrics_match_numpy(npy: Path, xs: np.ndarray, tmp_path: Path) -> None:
    onnx.save(fp32_model(), tmp_path / "fp.onnx")
    src = open_data(npy, ["x"])
    labels = np.random.default_rng(2).integers(0, 3, size=len(xs))
    report = compare(tmp_path / "fp.onnx", quant_model(), src, labels=labels, batch_size=8, progress=False,
                     optimization="disabled")
    want = reference(xs)
    (out,) = report.outputs
    assert report.num_samples == 37 and out.name == "y"
    assert out.sqnr_db == pytest.approx(manual_sqnr(want["y"], want["yq"]), abs=1e-3)
    assert out.max_abs_diff == pytest.approx(np.abs(want["y"] - want["yq"]).max(), abs=1e-5)
    top_r, top_q = want["y"].argmax(-1), want["yq"].argmax(-1)
    assert out.top1_agreement == pytest.approx(np.mean(top_r == top_q))
    assert out.fp32_accuracy == pytest.approx(np.mean(top_r == labels))
    assert out.quant_accuracy == pytest.approx(np.mean(top_q == labels))
    assert report.layers == []
    r, t = want["y"].astype(np.float64), want["yq"].astype(np.float64)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(t, axis=1)
    both_zero = ~r.any(axis=1) & ~t.any(axis=1)
    cos = np.where(both_zero, 1.0, np.sum(r * t, axis=1) / np.where(norms == 0, 1.0, norms))
    assert out.cosine == pytest.approx(cos.mean(), abs=1e-6)
    text = report.format()
    assert "SQNR dB" in text and "FP32 acc" in text and f"{100 * out.quant_accuracy:.2f} %" in text
    assert "cosine" in text and f"{out.cosine:.4f}" in text


def test_compare_takes_paths_like_quantize(tmp_path: Path, npy: Path, xs: np.ndarray) -> None:
    """qdq.compare(fp32_path, quant_path, "data.npy"): the data is opened with the FP32 model's inputs."""
    import qdq

    onnx.save(fp32_model(), tmp_path / "fp.onnx")
    onnx.save(quant_model(), tmp_path / "q.onnx")
    by_path = qdq.compare(tmp_path / "fp.onnx", str(tmp_path / "q.onnx"), str(npy), progress=False, num_samples=30)
    by_batches = compare(fp32_model(), quant_model(), [{"x": xs[:30]}], progress=False)
    assert by_path.num_samples == 30
    assert by_path.outputs[0].sqnr_db == pytest.approx(by_batches.outputs[0].sqnr_db, abs=1e-9)
    assert by_path.outputs[0].cosine == pytest.approx(by_batches.outputs[0].cosine, abs=1e-12)


def test_per_layer_finds_activations_and_matches_numpy(npy: Path, xs: np.ndarray) -> None:
    found = find_quantized_activations(quant_model())
    assert [(a.reference, a.quantized, a.node) for a in found] == [("x", "x_dq", "q_x"), ("m", "m_dq", "q_m")]
    report = compare(fp32_model(), quant_model(), open_data(npy, ["x"]), per_layer=True, batch_size=10,
                     progress=False)
    assert report.optimization == "disabled"
    want = reference(xs)
    by_name = {m.name: m for m in report.layers}
    assert set(by_name) == {"x", "m"}
    assert by_name["x"].sqnr_db == pytest.approx(manual_sqnr(xs, fq(xs, SX)), abs=1e-6)
    assert by_name["m"].sqnr_db == pytest.approx(manual_sqnr(want["m"], want["mq"]), abs=1e-3)
    assert [m.sqnr_db for m in report.layers] == sorted(m.sqnr_db for m in report.layers)  # worst first
    assert "per-layer SQNR, worst first (2 quantized activations)" in report.format()


def test_identical_models_are_lossless(xs: np.ndarray) -> None:
    model = ir.serde.deserialize_model(fp32_model())  # an onnx_ir.Model works too
    batches = [{"x": xs[:20]}, {"x": xs[20:]}]
    report = compare(model, fp32_model(), batches, per_layer=True, progress=False)
    (out,) = report.outputs
    assert out.sqnr_db == math.inf and out.top1_agreement == 1.0 and out.max_abs_diff == 0.0
    assert out.fp32_accuracy is None and report.layers == []
    d = report.to_dict()
    assert d["outputs"][0]["sqnr_db"] == "inf" and d["num_samples"] == 37
    json.dumps(d, allow_nan=False)
    assert "inf" in report.format()


def test_fixed_batch_model_is_fed_its_batch_size(npy: Path, xs: np.ndarray) -> None:
    report = compare(fp32_model(batch=1), quant_model(batch=1), open_data(npy, ["x"]), batch_size=16, progress=False,
                     optimization="disabled")
    want = reference(xs)
    assert report.num_samples == 37
    assert report.outputs[0].sqnr_db == pytest.approx(manual_sqnr(want["y"], want["yq"]), abs=1e-3)
    # batches of any size run sample by sample on a batch-1 model
    small = compare(fp32_model(batch=1), quant_model(batch=1), [{"x": xs[:5]}, xs[5:], (xs[:0],)], progress=False,
                    optimization="disabled")
    assert small.num_samples == 37
    assert small.outputs[0].sqnr_db == pytest.approx(report.outputs[0].sqnr_db, abs=1e-6)


def test_quantized_tensor_missing_from_fp32_is_skipped(xs: np.ndarray) -> None:
    fp = fp32_model()
    for node in fp.graph.node:  # rename m -> m_renamed in the FP32 model only
        node.output[:] = ["m_renamed" if o == "m" else o for o in node.output]
        node.input[:] = ["m_renamed" if i == "m" else i for i in node.input]
    report = compare(fp, quant_model(), [{"x": xs}], per_layer=True, progress=False)
    assert [m.name for m in report.layers] == ["x"] and report.skipped_layers == ["m"]
    assert "not in the FP32 model, skipped: m" in report.format()


def test_labels_length_mismatch(npy: Path) -> None:
    with pytest.raises(DataError, match="5 labels but 37 samples"):
        compare(fp32_model(), quant_model(), open_data(npy, ["x"]), labels=np.zeros(5, int), progress=False)
    # labels for the whole file are fine when num_samples takes the first N
    report = compare(fp32_model(), quant_model(), open_data(npy, ["x"], num_samples=10),
                     labels=np.zeros(37, int), progress=False)
    assert report.num_samples == 10 and report.outputs[0].fp32_accuracy is not None


def test_input_name_mismatches(xs: np.ndarray, npy: Path, tmp_path: Path) -> None:
    other = fp32_model()
    other.graph.input[0].name = "z"
    other.graph.node[0].input[0] = "z"
    with pytest.raises(DataError, match=r"FP32 model inputs \(x\) differ from the quantized model inputs \(z\)"):
        compare(fp32_model(), other, [{"x": xs}], progress=False)
    with pytest.raises(DataError, match=r"data has inputs \(input\) but the model expects \(x\)"):
        compare(fp32_model(), quant_model(), [{"input": xs}], progress=False)
    np.savez(tmp_path / "d.npz", a=xs)
    with pytest.raises(DataError, match=r"opened for inputs \(a\) but the model inputs are \(x\)"):
        compare(fp32_model(), quant_model(), open_data(tmp_path / "d.npz", ["a"]), progress=False)
    with pytest.raises(DataError, match="evaluation data is empty"):
        compare(fp32_model(), quant_model(), [], progress=False)
    # a static-dim mismatch is caught before onnxruntime runs, naming the input, the shape and the expectation
    with pytest.raises(DataError, match=r"input 'x' got shape \(2, 5\) but the model expects float32 \(N, 4\) "
                                        r"\(dim 1 must be 4\)"):
        compare(fp32_model(), quant_model(), [{"x": np.zeros((2, 5), np.float32)}], progress=False)


def test_model_errors(tmp_path: Path, xs: np.ndarray) -> None:
    with pytest.raises(ModelError, match="FP32 model not found"):
        compare(tmp_path / "missing.onnx", quant_model(), [{"x": xs}], progress=False)
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError, match="the quantized model .*bad.onnx is not a readable ONNX model"):
        compare(fp32_model(), tmp_path / "bad.onnx", [{"x": xs}], progress=False)


def test_external_data_path_with_per_layer(tmp_path: Path, xs: np.ndarray) -> None:
    onnx.save(quant_model(), tmp_path / "q.onnx", save_as_external_data=True, location="q.data", size_threshold=0)
    report = compare(fp32_model(), tmp_path / "q.onnx", [{"x": xs}], per_layer=True, progress=False)
    assert {m.name for m in report.layers} == {"x", "m"}


def test_run_model_and_input_shapes(xs: np.ndarray) -> None:
    # "disabled" keeps the Q/DQ float emulation; "all" runs int8 kernels that may round differently
    outs = list(run_model(quant_model(), [{"x": xs[:3]}, {"x": xs[3:]}], optimization="disabled"))
    np.testing.assert_allclose(np.concatenate([o["y"] for o in outs]), reference(xs)["yq"], atol=1e-5)
    assert input_shapes(fp32_model()) == {"x": ("N", 4)}
    assert input_shapes(fp32_model(batch=1)) == {"x": (1, 4)}


def test_neighbour_agreement_of_embeddings() -> None:
    """Each sample's nearest other sample (cosine) under FP32 vs quantized; only [N, D] float outputs count."""
    from qdq.metrics import NeighbourAgreement

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 8)).astype(np.float32)
    same = NeighbourAgreement()
    noisy = NeighbourAgreement(limit=30)
    for i in range(0, 40, 16):
        same.update(ref[i:i + 16], ref[i:i + 16] * 3.0, len(ref[i:i + 16]))  # scale does not change cosine
        noisy.update(ref[i:i + 16], ref[i:i + 16] + rng.standard_normal((len(ref[i:i + 16]), 8)).astype(np.float32),
                     len(ref[i:i + 16]))
    assert same.rate == 1.0 and same.count == 40
    assert noisy.count == 30  # the limit
    e = ref[:30] / np.linalg.norm(ref[:30], axis=1, keepdims=True)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    t = np.concatenate(noisy.test)
    et = t / np.linalg.norm(t, axis=1, keepdims=True)
    st = et @ et.T
    np.fill_diagonal(st, -np.inf)
    assert noisy.rate == pytest.approx(np.mean(sims.argmax(1) == st.argmax(1))) and noisy.rate < 1.0
    scalar = NeighbourAgreement()
    scalar.update(np.zeros((4,), np.float32), np.zeros((4,), np.float32), 4)  # not an embedding: ignored
    assert scalar.rate is None


def _with_extra_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` plus an int64 argmax output and a sequence output (SplitToSequence of y)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.extend([helper.make_node("ArgMax", ["y"], ["ids"], axis=1, keepdims=0, name="am"),
                         helper.make_node("SplitToSequence", ["y"], ["seq"], axis=1, name="sts")])
    m.graph.output.extend([helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
                           helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)])
    return m


def test_integer_and_sequence_outputs(xs: np.ndarray) -> None:
    """An int64 argmax output is compared element by element ('equal'; no cosine); a sequence output (a list of
    tensors from onnxruntime) as its joined values: it used to be an internal AttributeError."""
    report = compare(_with_extra_outputs(fp32_model()), _with_extra_outputs(quant_model()), xs, progress=False)
    by = {o.name: o for o in report.outputs}
    ref, q = reference(xs)["y"], reference(xs)["yq"]
    assert by["ids"].exact_match == pytest.approx(np.mean(ref.argmax(1) == q.argmax(1)))
    assert by["ids"].cosine is None and by["ids"].top1_agreement is None
    assert by["seq"].sqnr_db == pytest.approx(manual_sqnr(ref, q), abs=0.05)
    assert by["y"].exact_match is None
    assert "equal" in report.format().splitlines()[1]


def test_token_logits_get_per_token_agreement(token_lm) -> None:
    """[N, S, vocab] logits from a linear head (an LM, a token classifier, CTC): top-1 agreement per token."""
    import qdq

    fp = token_lm(vocab=6)
    x = np.random.default_rng(0).standard_normal((12, 5, 16)).astype(np.float32)
    q = qdq.quantize(fp, "w4", [x], progress=False)
    report = compare(fp, q, x, progress=False)
    ref, test = next(run_model(fp, [x]))["logits"], next(run_model(q, [x]))["logits"]
    assert report.outputs[0].top1_agreement == pytest.approx(np.mean(ref.argmax(-1) == test.argmax(-1)))


def test_token_agreement_leaves_out_padding_and_residual_outputs(tmp_path: Path) -> None:
    """Padding positions (attention_mask 0) do not count in per-token agreement; a residual Add's [N, S, D] output
    is not token logits (no agreement figure)."""
    import qdq

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"]),
                               helper.make_node("Add", ["logits", "x"], ["resid"]),
                               helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
                               helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
                               helper.make_node("Mul", ["logits", "m3"], ["masked"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 8]),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", 8]),
                               helper.make_tensor_value_info("resid", TensorProto.FLOAT, ["N", "S", 8])],
                              [w, numpy_helper.from_array(np.array([2], np.int64), "axis")])
    fp = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), fp)
    x = rng.standard_normal((6, 5, 8)).astype(np.float32)
    mask = np.ones((6, 5), np.int64)
    mask[:, 3:] = 0
    q = qdq.quantize(fp, "w4", [{"x": x, "attention_mask": mask}], progress=False)
    report = compare(fp, q, [{"x": x, "attention_mask": mask}], progress=False)
    by = {o.name: o for o in report.outputs}
    ref, test = (next(run_model(m, [{"x": x, "attention_mask": mask}]))["logits"] for m in (fp, q))
    keep = mask != 0
    assert by["logits"].top1_agreement == pytest.approx(np.mean(ref.argmax(-1)[keep] == test.argmax(-1)[keep]))
    assert by["resid"].top1_agreement is None
