"""Automatic fallback to an accuracy target, and float ops that stay float in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import qdq
from qdq import ConfigError, QuantizerConfig
from qdq.backends.ort_inspect import optimized_model
from qdq.fallback import _fewest, _with_float_ops, search_fallback
from qdq.quantizer import Quantizer


def _calibrated(path: Path, x: np.ndarray, config: object = "int8") -> Quantizer:
    q = Quantizer(path, config)
    q.prepare()
    q.calibrate([x[i:i + 64] for i in range(0, len(x), 64)], progress=False)
    return q


def test_a_float_conv_stays_float_in_onnxruntime(digits_onnx, digits_data, tmp_path: Path) -> None:
    """onnxruntime quantizes a float Conv's weight per tensor when its input is dequantized (WeightBiasQuantization);
    the finalized model gives that Conv a per-channel DQ of its own, so it runs float: its weight stays float32 in
    onnxruntime's optimized graph, the other Convs are integer kernels, and no value changes."""
    import onnx_ir as ir

    from qdq.validate import compare

    x = digits_data[0][:256]
    conv = [n.name for n in ir.load(digits_onnx).graph if n.op_type == "Conv"][1]
    path = tmp_path / "one_float.onnx"
    qdq.quantize(digits_onnx, QuantizerConfig.from_dict({"op_name_configs": {conv: None}}), [x], output=path,
                 progress=False)
    opt = optimized_model(path)
    inits = {t.name: t for t in opt.graph.initializer}
    kinds = [n.op_type for n in opt.graph.node]
    assert kinds.count("QLinearConv") == 2, kinds
    float_convs = [n for n in opt.graph.node if n.op_type in ("Conv", "FusedConv")]
    assert len(float_convs) == 1 and inits[float_convs[0].input[1]].data_type == onnx.TensorProto.FLOAT
    fast = compare(digits_onnx, path, x[:128], progress=False).outputs[0].sqnr_db
    exact = compare(digits_onnx, path, x[:128], progress=False, optimization="none").outputs[0].sqnr_db
    assert abs(fast - exact) < 0.5, (fast, exact)


def test_fallback_reaches_the_target_with_a_minimal_set(digits_onnx, digits_data) -> None:
    x = digits_data[0][:512]
    q = _calibrated(digits_onnx, x)
    measure = [{"x": x[i:i + 128]} for i in range(0, 256, 128)]
    base = search_fallback(q, measure, metric="sqnr", target=0.0, progress=False)
    assert base.ops == [] and base.evaluations == 1  # already met: nothing float, one evaluation
    target = base.before + 3.0
    r = search_fallback(q, measure, metric="sqnr", target=target, progress=False)
    assert r.reached and r.after >= target > r.before and 0 < len(r.ops) < r.candidates
    assert r.speed_cost is not None and r.speed_cost > 0
    assert set(r.sensitivity) <= set(r.ops) | set(r.sensitivity)
    for op in r.ops:  # minimal: quantizing any chosen op again misses the target
        rest = [o for o in r.ops if o != op]
        again = search_fallback(q.replan(_with_float_ops(q.config, rest)), measure, metric="sqnr", target=-1e9,
                                progress=False)
        assert again.before < target
    assert r.quantizer.config.op_name_configs == {op: None for op in r.ops}
    assert q.config.op_name_configs == {}  # the calibrated quantizer is untouched


def test_replan_reuses_statistics_and_equals_a_fresh_run(digits_onnx, digits_data) -> None:
    """Re-planning a calibrated quantizer with a float op gives the model a fresh quantize with that config gives
    (same data): no recalibration, same integers."""
    import onnx_ir as ir

    x = digits_data[0][:256]
    q = _calibrated(digits_onnx, x)
    conv = next(n.name for n in ir.load(digits_onnx).graph if n.op_type == "Conv")
    cfg = _with_float_ops(q.config, [conv])
    replanned = q.replan(cfg)
    assert replanned.missing_statistics == []
    fresh = _calibrated(digits_onnx, x, cfg)
    a, b = (ir.serde.serialize_model(m.finalize()) for m in (replanned, fresh))
    ia = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in a.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in b.graph.initializer}
    assert ia == ib and len(a.graph.node) == len(b.graph.node)


def test_cli_target_writes_a_config_that_reproduces_the_model(digits_onnx, digits_data, tmp_path: Path,
                                                              capsys) -> None:
    from qdq.cli import main

    x = digits_data[0][:384]
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "q.onnx"
    q = _calibrated(digits_onnx, x)
    base = search_fallback(q, [{"x": x[:256]}], metric="sqnr", target=0.0, progress=False).before
    assert main(["quantize", str(digits_onnx), "-o", str(out), "--calib-data", str(tmp_path / "calib.npy"),
                 "--target-sqnr", f"{base + 2:.2f}", "--holdout", "256"]) == 0
    printed = capsys.readouterr().out
    assert "target sqnr >=" in printed and "q.fallback.yaml" in printed
    yaml = tmp_path / "q.fallback.yaml"
    cfg = QuantizerConfig.from_yaml(yaml)
    assert cfg.op_name_configs and all(v is None for v in cfg.op_name_configs.values())
    again = tmp_path / "again.onnx"
    assert main(["quantize", str(digits_onnx), "-o", str(again), "--calib-data", str(tmp_path / "calib.npy"),
                 "--config", str(yaml), "--quiet"]) == 0
    a, b = onnx.load(out), onnx.load(again)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}


def test_target_errors_are_one_line(digits_onnx, digits_data, attention_onnx, tmp_path: Path) -> None:
    x = digits_data[0][:64]
    with pytest.raises(ConfigError, match="one accuracy target"):
        qdq.quantize(digits_onnx, "int8", [x], progress=False, target_sqnr=30, target_cosine=0.99)
    with pytest.raises(ConfigError, match="calib-data"):
        qdq.quantize(digits_onnx, "w8", None, progress=False, target_sqnr=30)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, 8, 16)).astype(np.float32) for _ in range(2)]
    with pytest.raises(ConfigError, match="class scores"):
        qdq.quantize(attention_onnx, "int8", calib, progress=False, target_agreement=99.0)
    r = []
    qdq.quantize(attention_onnx, "int8", calib, progress=False, target_cosine=0.5, on_fallback=r.append)
    assert r[0].reached and r[0].ops == []


def test_unreachable_target_on_a_static_batch_model(tmp_path: Path) -> None:
    """A model with a static batch of 1 is measured in runs of its batch. A target only FP32 itself meets is met
    with every op float; one no set meets, and the fully quantized model is already as close to as any set gets,
    is reported as not reached with nothing left float, not an error."""
    from models.zoo import ZOO

    zoo = ZOO["static_cnn"]
    path = zoo.export(tmp_path / "static.onnx")
    found: list = []
    qdq.quantize(path, "int8", [zoo.data(8, 0)], progress=False, target_sqnr=1000.0, holdout=8,
                 on_fallback=found.append)
    r = found[0]
    assert r.reached and 0 < len(r.ops) <= r.candidates and r.after == float("inf")  # FP32 itself
    qdq.quantize(path, "int8", [zoo.data(8, 0)], progress=False, target_cosine=1.01, holdout=8,
                 on_fallback=found.append)
    r = found[1]  # int8 is already within 1e-4 cosine of FP32 here
    assert not r.reached and r.ops == [] and "or improves on the fully quantized model" in r.summary()


def test_w4_target_raises_weights_to_int8_per_channel_before_leaving_ops_float(digits_onnx, digits_data) -> None:
    """Raising precision is tried first: an op whose 4-bit weight hurts gets int8 per-channel weights (its own
    op_name_configs entry, which round-trips through YAML) rather than being left float."""
    from qdq.dtypes import QDType

    x = digits_data[0][:256]
    q = _calibrated(digits_onnx, x, "w4")
    measure = [{"x": x}]
    before = search_fallback(q, measure, metric="sqnr", target=-100.0, progress=False).before
    r = search_fallback(q, measure, metric="sqnr", target=before + 6.0, progress=False, measure_speed=False)
    assert r.reached and r.raised and not r.ops, r.summary()
    assert "with int8 per-channel weights instead" in r.summary()
    for op in r.raised:
        spec = r.config.op_name_configs[op].op_state_spec["weight"]
        assert spec.dtype is QDType.INT8 and spec.granularity.to_dict()["type"] == "per_channel"
    assert QuantizerConfig.from_yaml(r.config.to_yaml()).op_name_configs == r.config.op_name_configs
    weights = {t.tensor: t for t in r.quantizer.plan.targets.values() if t.kind == "weight"}
    assert {t.spec.dtype for t in weights.values()} == {QDType.INT4, QDType.INT8}


def test_unreachable_target_takes_the_fewest_ops_that_get_closest() -> None:
    """No set meets the target: the search aims at the best metric every candidate reaches, with the fewest ops
    (not every candidate float); when that is no better than the fully quantized model, no op is left float."""
    gains = {"a": 0.5, "b": 3.0, "c": 0.0, "d": 1.0}  # metric gained by leaving each op float; c gains nothing

    def trial(chosen):
        return (90.0 + sum(gains[op] for op in chosen), 30.0 + sum(gains[op] for op in chosen), None)

    chosen, score, _ = _fewest(list(gains), 99.5, trial, progress=False)
    assert sorted(chosen) == ["a", "b", "d"] and score == 94.5  # c dropped: it changes nothing
    chosen, score, _ = _fewest(list(gains), 99.5, trial, progress=False, tolerance=0.6)
    assert sorted(chosen) == ["b", "d"] and score == 94.0  # a's 0.5 is below the gain that counts
    flat = lambda chosen: (90.0, 30.0, None)  # no op moves the metric
    assert _fewest(list(gains), 99.5, flat, progress=False)[:2] == ([], 90.0)
    assert _fewest(list(gains), 99.5, trial, progress=False, tolerance=5.0)[:2] == ([], 90.0)  # 4.5 < 5: nothing
    assert sorted(_fewest(list(gains), 93.0, trial, progress=False)[0]) == ["b"]  # reachable: as before


def test_agreement_target_on_token_logits(token_lm) -> None:
    """[N, S, vocab] logits from a linear head: --target-agreement counts per token (it refused them)."""
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((8, 6, 16)).astype(np.float32) for _ in range(2)]
    r = []
    qdq.quantize(token_lm(hidden=32), "w4", calib, progress=False, target_agreement=99.9, on_fallback=r.append)
    assert r[0].reached and r[0].after >= 99.9 > r[0].before


def test_agreement_target_on_batches_of_different_lengths(token_lm) -> None:
    """Token logits from batches of different sequence lengths are joined token by token (a raw ValueError before)."""
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, s, 16)).astype(np.float32) for s in (6, 4, 6, 4)]
    r = []
    qdq.quantize(token_lm(), "w4", calib, progress=False, target_agreement=99.0, on_fallback=r.append)
    assert r[0].reached
