"""Calibration statistics never assume a layout, and a static batch gives the qparams of a dynamic one.

Models are built with onnx.helper so each test controls the batch dim (static 1, static 4 or
dynamic) and the layouts of the observed tensors (sequence-major, merged heads, attention scores,
scalars, rank 1). References are computed with numpy from the FP32 model's own intermediate
tensors, fetched from onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq import ModuleQuantizerConfig, QuantizationSpec, Quantizer, QuantizerConfig
from qdq.calibration.base import QParamsCalculatorBase
from qdq.calibration.channel_mean import ChannelMean
from qdq.calibration.runner import CalibrationRunner
from qdq.layout import QLayout
from qdq.session import make_session

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def cnn(batch: int | str) -> ir.Model:
    """Conv-Relu-Conv(stride 2)-Relu-GlobalAveragePool-Flatten-Gemm on [batch, 3, 8, 8]."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)


def _config(calculator: str) -> QuantizerConfig:
    act = QuantizationSpec(dtype="int8", qparam_calculator_cls=calculator)
    return QuantizerConfig(global_config=ModuleQuantizerConfig(op_input_spec={"*": act}, op_output_spec={"*": act}),
                           bias_correction=True)


def _calibrated_qparams(model: ir.Model, calculator: str, x: np.ndarray, batch: int) -> tuple[dict, int, dict, Quantizer]:
    q = Quantizer(model, _config(calculator))
    q.prepare()
    q.calibrate((x[i:i + batch] for i in range(0, len(x), batch)), progress=False)
    assert q._runner is not None
    qp = {k: (np.asarray(v.scale), np.asarray(v.zero_point)) for k, v in q.qparams.items()}
    means = {k: m.mean for k, m in q._means.items()}
    return qp, q._runner.num_runs, means, q


@pytest.mark.parametrize("calculator", ["global_minmax", "moving_average", "percentile"])
@pytest.mark.parametrize("static", [1, 4])
def test_static_batch_export_gets_the_qparams_of_the_dynamic_one(calculator: str, static: int) -> None:
    """Batch 6 over 23 samples: a batch-1 export runs sample by sample, a batch-4 one pads its remainders;
    calculators see the same logical batches (moving_average updates once per batch of 6)."""
    x = RNG.standard_normal((23, 3, 8, 8)).astype(np.float32)
    dyn, _, dyn_means, _ = _calibrated_qparams(cnn("N"), calculator, x, 6)
    fixed, runs, means, _ = _calibrated_qparams(cnn(static), calculator, x, 6)
    assert runs == (23 if static == 1 else 4 * 2)  # batches of 6, 6, 6, 5: two runs of 4 each
    assert dyn.keys() == fixed.keys() and len(dyn) >= 6
    for key in dyn:
        np.testing.assert_array_equal(dyn[key][0], fixed[key][0], err_msg=key)
        np.testing.assert_array_equal(dyn[key][1], fixed[key][1], err_msg=key)
    # bias correction's channel means: the padded copies are not counted (float sums in another order)
    assert dyn_means.keys() == means.keys() and dyn_means
    for key in dyn_means:
        np.testing.assert_allclose(means[key], dyn_means[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_moving_average_sees_logical_batches_not_runs() -> None:
    """The EMA of a batch-1 export equals the EMA computed by hand over the batches of 6 (not over samples)."""
    x = RNG.standard_normal((18, 3, 8, 8)).astype(np.float32)
    qp, _, _, q = _calibrated_qparams(cnn(1), "moving_average", x, 6)
    sess = make_session(cnn("N"), extra_outputs=["r1"])
    c = np.float32(0.01)
    lo = hi = None
    for i in range(0, 18, 6):
        r1 = sess.run(["r1"], {"x": x[i:i + 6]})[0]
        blo, bhi = np.float32(r1.min()), np.float32(r1.max())
        lo, hi = (blo, bhi) if lo is None else ((c * blo + (1 - c) * lo), (c * bhi + (1 - c) * hi))
    from qdq.qparams import compute_qparams

    want = compute_qparams(q.targets["r1"].spec, np.float32(lo), np.float32(hi))
    np.testing.assert_array_equal(qp["r1"][0], np.asarray(want.scale))


# ----------------------------------------------------------------------------- layouts


def layouts(batch: int | str, seq: int | str = "S") -> ir.Model:
    """x [B, S, 8] -> projections and attention with every layout the runner must not assume:

    t   = Transpose(x @ W)      [S, B, 8]      sequence-major
    h   = Reshape(x @ W)        [B*2, S, 4]    merged heads
    sc  = q @ k^T               [B, 2, S, S]   attention scores
    m   = ReduceMean(x)         []             a scalar (batch 1; [B], per-sample means, otherwise)
    v   = ReduceMax(p, [1, 2])  [B]            rank 1

    No op mixes samples, so a batch run whole, in micro-batches or sample by sample gives the same values.
    """
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([0, -1, 4], np.int64), "heads"),
             numpy_helper.from_array(np.array([0, 0, 2, 4], np.int64), "split4"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes12")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["p"], name="proj"),
             helper.make_node("Transpose", ["p"], ["t"], name="seq_major", perm=[1, 0, 2]),
             helper.make_node("Transpose", ["p"], ["pt"], name="to_bsd", perm=[0, 1, 2]),
             helper.make_node("Reshape", ["pt", "split4"], ["q4"], name="split_heads"),  # [B, S, 2, 4]
             helper.make_node("Transpose", ["q4"], ["qh"], name="heads_first", perm=[0, 2, 1, 3]),  # [B, 2, S, 4]
             helper.make_node("Transpose", ["qh"], ["kt"], name="k_t", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qh", "kt"], ["sc"], name="scores"),
             helper.make_node("Flatten", ["qh"], ["qf"], name="flat_heads", axis=2),  # [B*2, S*4]
             helper.make_node("Reshape", ["qf", "heads"], ["h"], name="merge_heads"),  # [B*2, S, 4]
             helper.make_node("Relu", ["t"], ["tr"], name="relu_t"),
             helper.make_node("ReduceMean", ["x"] if batch == 1 else ["x", "axes12"], ["m"], name="mean", keepdims=0),
             helper.make_node("ReduceMax", ["p", "axes12"], ["v"], name="max_sd", keepdims=0)]
    b2 = f"{batch}*2" if isinstance(batch, str) else 2 * batch
    shapes = {"tr": [seq, batch, 8], "sc": [batch, 2, seq, seq], "h": [b2, seq, 4], "m": [] if batch == 1 else [batch],
              "v": [batch]}
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, 8])], outs, inits,
                  opset=18)


OBSERVED = ["t", "h", "sc", "m", "v", "p"]


def _spec_calc(name: str, axis: int | None = None) -> QParamsCalculatorBase:
    spec = QuantizationSpec(dtype="int8", qparam_calculator_cls=name)
    return QParamsCalculatorBase.create(spec, QLayout(axis=axis), is_weight=False)


def _reference(x_batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every observed tensor of every batch, from the FP32 model's own outputs, joined flat."""
    sess = make_session(layouts("B"), extra_outputs=OBSERVED)
    per = {n: [] for n in OBSERVED}
    for xb in x_batches:
        for n, v in zip(OBSERVED, sess.run(OBSERVED, {"x": xb})):
            per[n].append(v)
    return per


@pytest.mark.parametrize("batch", ["B", 2, 1])
def test_minmax_histograms_and_sums_are_exact_for_any_layout(batch: int | str) -> None:
    x = RNG.standard_normal((10, 5, 8)).astype(np.float32) * 3
    batches = [x[0:4], x[4:8], x[8:10]]  # multiples of the static batch 2: nothing is padded
    calcs: dict[str, list] = {n: [_spec_calc("global_minmax"), _spec_calc("percentile")] for n in OBSERVED}
    calcs["t"].append(_spec_calc("global_minmax", axis=2))  # per channel along the last axis of [S, B, D]
    calcs["t"].append(ChannelMean(2))
    calcs["sc"].append(ChannelMean(1))  # per head of [B, H, S, S]
    runner = CalibrationRunner(layouts(batch), calcs)
    for b in batches:
        runner.observe(b)
    # min/max and sums are computed inside onnxruntime, never copied out
    reduced = {(r.tensor, r.kind) for r in runner.reductions}
    assert {(n, "minmax") for n in OBSERVED} <= reduced and {("t", "sum"), ("sc", "sum")} <= reduced
    ref = _reference(batches)
    for name in OBSERVED:
        flat = np.concatenate([v.reshape(-1) for v in ref[name]])
        mm, pct = calcs[name][0], calcs[name][1]
        assert (float(mm.min_val), float(mm.max_val)) == (flat.min(), flat.max()), name
        direct = _spec_calc("percentile")
        direct.observe(flat)
        np.testing.assert_array_equal(pct.hist.used()[0], direct.hist.used()[0], err_msg=name)
        assert pct.hist.width == direct.hist.width and pct.compute_range() == direct.compute_range()
    t = np.concatenate(ref["t"], axis=1)  # [S, B, D]
    np.testing.assert_array_equal(calcs["t"][2].min_val, t.min(axis=(0, 1)))
    np.testing.assert_array_equal(calcs["t"][2].max_val, t.max(axis=(0, 1)))
    np.testing.assert_allclose(calcs["t"][3].mean, t.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    assert calcs["t"][3].count == t.size // t.shape[2]
    sc = np.concatenate(ref["sc"])
    np.testing.assert_allclose(calcs["sc"][2].mean, sc.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert calcs["sc"][2].count == sc.size // sc.shape[1]


def test_dynamic_sequence_length_and_micro_batches() -> None:
    """Batches of several sequence lengths, run in micro-batches of one sample (tiny chunk_bytes)."""
    calcs = {n: [_spec_calc("global_minmax"), _spec_calc("percentile")] for n in OBSERVED}
    calcs["h"].append(ChannelMean(2))  # reduced dims are dynamic: counted from the runtime shape
    runner = CalibrationRunner(layouts("B", "S"), calcs, chunk_bytes=1)
    batches = [RNG.standard_normal((3, s, 8)).astype(np.float32) for s in (4, 7, 1)]
    for b in batches:
        runner.observe(b)
    assert runner.num_runs == 9 and runner.num_batches == 3
    ref = _reference(batches)
    for name in OBSERVED:
        flat = np.concatenate([v.reshape(-1) for v in ref[name]])
        assert (float(calcs[name][0].min_val), float(calcs[name][0].max_val)) == (flat.min(), flat.max()), name
        assert calcs[name][1].hist.counts.sum() == flat.size, name
    h = np.concatenate([v.reshape(-1, 4) for v in ref["h"]])
    np.testing.assert_allclose(calcs["h"][2].mean, h.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert calcs["h"][2].count == len(h)


def test_padded_remainder_keeps_minmax_exact_and_drops_copies_where_it_can(caplog) -> None:
    """Static batch 2, batches of 3: min/max exact everywhere; sums and histograms of [B, ...] tensors drop
    the copy; a sequence-major tensor cannot, and a warning says so."""
    x = RNG.standard_normal((3, 5, 8)).astype(np.float32)
    calcs = {"p": [_spec_calc("global_minmax"), _spec_calc("percentile"), ChannelMean(2)],
             "t": [_spec_calc("global_minmax"), _spec_calc("percentile")]}
    runner = CalibrationRunner(layouts(2, 5), calcs)
    with caplog.at_level("WARNING"):
        runner.observe(x)
    assert runner.num_runs == 2
    p = _reference([x])["p"][0]
    assert (float(calcs["p"][0].min_val), float(calcs["p"][0].max_val)) == (p.min(), p.max())
    assert calcs["p"][1].hist.counts.sum() == p.size  # the padded copy is not counted
    np.testing.assert_allclose(calcs["p"][2].mean, p.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    assert calcs["p"][2].count == p.size // 8
    t = p.transpose(1, 0, 2)
    assert (float(calcs["t"][0].min_val), float(calcs["t"][0].max_val)) == (t.min(), t.max())
    assert calcs["t"][1].hist.counts.sum() == 4 * 5 * 8  # [S, B, D]: the copy counts, and we are told
    assert any("tensor 't'" in r.message and "padded" in r.message for r in caplog.records)


def test_chunked_histogram_equals_whole_batch_histogram() -> None:
    """Power-of-two grids: a batch fed in chunks of any size gives exactly the histogram of the whole batch."""
    x = (RNG.standard_normal(50_000) * np.linspace(0.1, 5, 50_000)).astype(np.float32)
    for qscheme in ("symmetric", "asymmetric"):
        spec = QuantizationSpec(dtype="int8" if qscheme == "symmetric" else "uint8", qscheme=qscheme,
                                qparam_calculator_cls="percentile")
        whole = QParamsCalculatorBase.create(spec, QLayout(), is_weight=False)
        whole.observe(x)
        for step in (1_000, 7_777, 20_000):
            parts = QParamsCalculatorBase.create(spec, QLayout(), is_weight=False)
            for i in range(0, len(x), step):
                parts.observe_chunk(x[i:i + step])
            parts.end_batch()
            assert parts.hist.width == whole.hist.width
            u1, s1 = parts.hist.used()
            u2, s2 = whole.hist.used()
            assert s1 == s2
            np.testing.assert_array_equal(u1, u2)
            assert parts.compute_range() == whole.compute_range()
