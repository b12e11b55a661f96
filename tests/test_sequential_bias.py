"""Sequential bias correction: after calibration, each quantized layer's output mean matches the float model's."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

import qdq
from qdq import ConfigError
from qdq.algorithms import parse_algorithm
from qdq.algorithms.sequential_bias import correction_sites
from qdq.model_inputs import model_inputs
from qdq.presets import preset
from qdq.quantizer import Quantizer
from qdq.session import make_session, run_batched

SBC = {"name": "sequential_bias_correction"}


def _activation_means(model, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Per-channel means of ``names`` after their Relu (what the next layer sees), on ``x``."""
    outs = make_session(model, level="none", extra_outputs=names).run(names, {"x": x})
    return {n: np.maximum(o, 0).mean(axis=tuple(i for i in range(o.ndim) if i != 1)) for n, o in
            zip(names, outs, strict=True)}


def test_corrects_the_mean_each_layer_passes_on(digits_onnx, digits_data) -> None:
    x_tr, _, x_te, _ = digits_data
    cfg = dataclasses.replace(preset("int8"), algorithms=[SBC], bias_correction=False)
    q = Quantizer(digits_onnx, cfg)
    q.progress = False
    assert q.apply_algorithms([x_tr[:64]]) == []  # a calibrated-stage algorithm: not run before calibration
    assert q.pending_calibrated_algorithms == ["sequential_bias_correction"]
    q.prepare()
    q.calibrate([x_tr[i:i + 64] for i in range(0, 512, 64)], progress=False)
    sites = correction_sites(q.float_model, {t.tensor for t in q.targets.values() if t.kind == "weight"})
    convs = [out.name for node, _, out, _ in sites if node.op_type == "Conv"
             and [u.node.op_type for u in out.uses()] == ["Relu"]]  # the means below are taken after a Relu
    assert len(convs) >= 2
    reference = _activation_means(str(digits_onnx), x_tr[:256], convs)
    before = _activation_means(q.qdq_model(), x_tr[:256], convs)
    notes = q.apply_calibrated_algorithms([x_tr[i:i + 64] for i in range(0, 512, 64)])
    assert notes[0].startswith(f"sequential_bias_correction: {len(sites)} biases corrected on 128 samples")
    assert q.pending_calibrated_algorithms == []
    after = _activation_means(q.qdq_model(), x_tr[:256], convs)
    for name in convs:
        err_before = np.abs(before[name] - reference[name]).mean()
        err_after = np.abs(after[name] - reference[name]).mean()
        assert err_after < 0.5 * err_before, (name, err_before, err_after)
    # and on held-out digits the logits get closer to the float model's
    ref = make_session(str(digits_onnx)).run(None, {"x": x_te})[0]
    plain = make_session(qdq.quantize(digits_onnx, dataclasses.replace(cfg, algorithms=[]),
                                      [x_tr[i:i + 64] for i in range(0, 512, 64)], progress=False)).run(
        None, {"x": x_te})[0]
    got = make_session(q.finalize()).run(None, {"x": x_te})[0]
    assert np.mean((got - ref) ** 2) < np.mean((plain - ref) ** 2)


def test_finalize_without_it_warns_and_skips(digits_onnx, digits_data, caplog) -> None:
    q = Quantizer(digits_onnx, dataclasses.replace(preset("int8"), algorithms=[SBC]))
    q.prepare()
    q.calibrate([digits_data[0][:64]], progress=False)
    with caplog.at_level(logging.WARNING, logger="qdq.quantizer"):
        q.finalize()
    assert "sequential_bias_correction" in caplog.text and "apply_calibrated_algorithms" in caplog.text
    assert any("skipped" in n for n in q.algorithm_notes)


def test_needs_calibrated_ranges(digits_onnx, digits_data) -> None:
    q = Quantizer(digits_onnx, dataclasses.replace(preset("int8"), algorithms=[SBC]))
    q.prepare()
    with pytest.raises(qdq.DataError, match="not calibrated"):
        q.apply_calibrated_algorithms([digits_data[0][:64]])


def test_a_layer_left_float_gets_its_bias_back(digits_onnx, digits_data) -> None:
    import onnx

    from qdq.fallback import _with_float_ops

    x_tr = digits_data[0]
    original = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(digits_onnx)).graph.initializer}
    q = Quantizer(digits_onnx, dataclasses.replace(preset("int8"), algorithms=[SBC], bias_correction=False))
    q.progress = False
    q.prepare()
    q.calibrate([x_tr[:256]], progress=False)
    q.apply_calibrated_algorithms([x_tr[:256]])
    conv = next(n for n in q.float_model.graph if n.op_type == "Conv")
    bias = conv.inputs[2].name
    assert not np.array_equal(q.float_model.graph.initializers[bias].const_value.numpy(), original[bias])
    new = q.replan(_with_float_ops(q.config, [conv.name]))
    np.testing.assert_array_equal(new.float_model.graph.initializers[bias].const_value.numpy(), original[bias])


def test_fallback_candidates_leave_the_corrections_out(digits_onnx, digits_data) -> None:
    """The corrections were computed for the fully quantized model: a fallback candidate (another config) runs
    without them, every bias as before the algorithm; the rebuild of the chosen config computes them again."""
    import onnx

    from qdq.fallback import _with_float_ops, search_fallback

    x_tr = digits_data[0]
    original = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(digits_onnx)).graph.initializer}
    q = Quantizer(digits_onnx, dataclasses.replace(preset("int8"), algorithms=[SBC], bias_correction=False))
    q.progress = False
    assert not q.calibrated_corrections
    q.prepare()
    q.calibrate([x_tr[:256]], progress=False)
    q.apply_calibrated_algorithms([x_tr[:256]])
    assert q.calibrated_corrections
    convs = [n for n in q.float_model.graph if n.op_type in ("Conv", "Gemm")]
    moved = [n.inputs[2].name for n in convs if not np.array_equal(
        q.float_model.graph.initializers[n.inputs[2].name].const_value.numpy(), original[n.inputs[2].name])]
    assert len(moved) >= 3
    kept = q.replan(_with_float_ops(q.config, [convs[0].name]))  # default: the corrections stay
    bare = q.replan(_with_float_ops(q.config, [convs[0].name]), calibrated_algorithms=False)
    for name in moved:
        np.testing.assert_array_equal(bare.float_model.graph.initializers[name].const_value.numpy(), original[name])
    assert any(not np.array_equal(kept.float_model.graph.initializers[n].const_value.numpy(), original[n])
               for n in moved[1:])
    # a target the fully quantized model already meets: that model comes back, corrections included
    met = search_fallback(q, [{"x": x_tr[:64]}], metric="sqnr", target=0.0, progress=False, measure_speed=False)
    assert met.quantizer is q and not met.ops
    # an unreachable target: the closest candidate, uncorrected (qdq.quantize rebuilds it with its corrections)
    far = search_fallback(q, [{"x": x_tr[:64]}], metric="sqnr", target=500.0, progress=False, measure_speed=False)
    assert far.ops and not far.quantizer.calibrated_corrections, far.summary()


@pytest.mark.parametrize("name", ["bert", "static_cnn", "fp16"])
def test_runs_on_unseen_models(name: str, tmp_path) -> None:
    """A transformer with int64 inputs (MatMul + Add biases), a CNN whose batch is fixed at 1 fed 8-sample
    batches and a float16 CNN fed float32 data: each is corrected through qdq.quantize, and the output stays
    close to the float model's."""
    from models.zoo import ZOO

    zoo = ZOO[name]
    path = zoo.export(tmp_path / f"{name}.onnx")
    data = [zoo.data(8, i) for i in range(3)]
    cfg = dataclasses.replace(preset("int8"), algorithms=[dict(SBC, samples=16)])
    model = qdq.quantize(path, cfg, data, progress=False)
    inputs = model_inputs(str(path))
    feeds = inputs.feeds(data[0])
    ref = run_batched(make_session(str(path)), feeds, inputs)[0]
    got = run_batched(make_session(model), feeds, inputs)[0]
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
    assert sqnr > 15, sqnr
    q = Quantizer(path, cfg)
    sites = correction_sites(q.float_model, {t.tensor for t in q.targets.values() if t.kind == "weight"})
    assert sites and (name != "bert" or any(node.op_type == "MatMul" for node, *_ in sites))


def test_options() -> None:
    assert parse_algorithm("sequential_bias_correction:samples=0").options["samples"] == 0
    with pytest.raises(ConfigError, match="samples must be >= 0"):
        parse_algorithm("sequential_bias_correction:samples=-1")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_algorithm("sequential_bias_correction:iters=3")


def test_cli_fallback_yaml_with_it_reproduces_the_model(digits_onnx, digits_data, tmp_path) -> None:
    """`--algorithm sequential_bias_correction` with a target: the fallback YAML carries the algorithm, and
    `--config` with it rebuilds the same bytes (corrections computed again with the ops it leaves float)."""
    import onnx

    from qdq.cli import main
    from qdq.config import QuantizerConfig

    x = digits_data[0][:384]
    np.save(tmp_path / "calib.npy", x)
    out, again = tmp_path / "q.onnx", tmp_path / "again.onnx"
    common = ["--calib-data", str(tmp_path / "calib.npy"), "--quiet"]
    assert main(["quantize", str(digits_onnx), "-o", str(out), *common, "--algorithm",
                 "sequential_bias_correction:samples=64", "--target-sqnr", "60", "--holdout", "256"]) == 0
    yaml = tmp_path / "q.fallback.yaml"
    cfg = QuantizerConfig.from_yaml(yaml)
    assert {"name": "sequential_bias_correction", "samples": 64, "fetch_samples": 4} in cfg.algorithms
    assert cfg.op_name_configs  # 60 dB is out of int8's reach on this CNN: some ops are left float
    assert main(["quantize", str(digits_onnx), "-o", str(again), *common, "--config", str(yaml)]) == 0
    a, b = onnx.load(out), onnx.load(again)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}
