"""SmoothQuant as an algorithm pass: exact in float, folded or inserted, better int8, configurable everywhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import qdq
from qdq import ConfigError, QuantizerConfig
from qdq.algorithms import build_algorithm, parse_algorithm
from qdq.errors import DataError
from qdq.presets import preset
from qdq.quantizer import Quantizer
from qdq.session import make_session

C = 32


def _block(path: Path, residual: bool) -> Path:
    """x -> LayerNorm (gamma with 3 outlier channels x60) -> two MatMuls (q, k) [-> + residual Add of the LN output].

    As in trained transformers, the weights reading the outlier channels are small: every channel matters to the
    output, and per-tensor int8 of the LN output rounds the ordinary channels away."""
    rng = np.random.default_rng(0)
    outliers = [3, 11, 29]
    gamma = np.ones(C, np.float32)
    gamma[outliers] = 60.0
    wq, wk = (rng.normal(0, 0.2, (C, C)).astype(np.float32) for _ in range(2))
    wq[outliers] /= 60.0
    wk[outliers] /= 60.0
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), "b"),
             numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wk, "wk")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1),
             helper.make_node("MatMul", ["ln", "wq"], ["q"]), helper.make_node("MatMul", ["ln", "wk"], ["k"])]
    outputs = ["q", "k"]
    if residual:
        nodes.append(helper.make_node("Add", ["q", "ln"], ["r"]))
        outputs = ["r", "k"]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8, C])],
                              [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, ["n", 8, C]) for o in outputs],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _data(n: int = 64, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((8, 8, C)).astype(np.float32) for _ in range(n // 8)]


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    return make_session(model, level="none").run(None, {"x": x})


def _sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - test).astype(np.float64) ** 2)))


@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_is_exact_in_float_and_folds_or_inserts(tmp_path: Path, residual: bool) -> None:
    path = _block(tmp_path / "b.onnx", residual)
    model = ir.load(path)
    data = _data()
    notes = build_algorithm({"name": "smoothquant", "alpha": 0.5}).apply(model, lambda: ({"x": b} for b in data))
    assert "1 activations smoothed" in notes[0]
    x = _data(8, seed=7)[0]
    for want, got in zip(_run(str(path), x), _run(model, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    muls = [n for n in model.graph if n.op_type == "Mul"]
    gamma = model.graph.initializers["g"].const_value.numpy()
    if residual:  # the residual Add needs the unsmoothed LN output: a float Mul feeds the MatMuls only
        assert len(muls) == 1 and muls[0].metadata_props["qdq.keep_float"] == "smoothquant"
        assert gamma.max() == np.float32(60.0)  # the LayerNorm is untouched
        assert "0 folded" in notes[0] and "1 through an inserted Mul" in notes[0]
    else:  # 1/s folded into the LayerNorm's scale and bias: no new op
        assert not muls and "1 folded into their norm" in notes[0]
        assert gamma.max() / gamma.min() < 60.0 / 4  # the outlier channels are flattened


def test_int8_error_drops_and_the_inserted_mul_stays_float(tmp_path: Path) -> None:
    path = _block(tmp_path / "b.onnx", residual=False)
    data, x = _data(), _data(8, seed=7)[0]
    ref = _run(str(path), x)
    plain = qdq.quantize(path, dataclasses.replace(preset("int8"), algorithms=None), data, progress=False)
    smooth = qdq.quantize(path, "int8", data, progress=False)  # the int8 preset includes SmoothQuant
    plain_db = min(_sqnr(r, o) for r, o in zip(ref, _run(plain, x), strict=True))
    smooth_db = min(_sqnr(r, o) for r, o in zip(ref, _run(smooth, x), strict=True))
    assert smooth_db > plain_db + 6.0, (plain_db, smooth_db)
    q = Quantizer(_block(tmp_path / "r.onnx", residual=True), "int8")  # int8 includes SmoothQuant
    assert q.pending_algorithms == ["smoothquant"]
    q.apply_algorithms(data)
    by_tensor = {t.tensor: t for t in q.plan.targets.values()}
    matmuls = {n.name for n in q.float_model.graph if n.op_type == "MatMul"}
    assert {n for n, _ in by_tensor["ln_smoothed"].uses} == matmuls  # the MatMuls read the smoothed tensor
    # the residual Add is the graph output, read as float (float_graph_outputs): it reads the raw LayerNorm output
    assert "ln" not in by_tensor
    assert any(n.op_type == "Add" and "ln" in [v.name for v in n.inputs if v is not None] for n in q.float_model.graph)


def test_prepare_without_data_skips_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     digits_onnx: Path) -> None:
    """The coreai_opt flow (prepare, calibration_mode) has no data before prepare: algorithms that would change
    the model are skipped with a warning; on a CNN SmoothQuant changes nothing and nothing is said."""
    import logging

    data = _data()
    with caplog.at_level(logging.WARNING, logger="qdq.quantizer"):
        q = Quantizer(_block(tmp_path / "b.onnx", residual=False), "int8")
        q.prepare(data[0])
    assert "['smoothquant'] skipped" in caplog.text and q.pending_algorithms == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qdq.quantizer"):
        Quantizer(digits_onnx, "int8").prepare(np.zeros((2, 1, 8, 8), np.float32))
    assert "skipped" not in caplog.text
    with pytest.raises(ConfigError, match="before prepare"):
        q.apply_algorithms(data)


def test_config_yaml_cli_and_errors(tmp_path: Path) -> None:
    cfg = QuantizerConfig.from_yaml("algorithms:\n  - {name: smoothquant, alpha: 0.6}\n")
    assert cfg.algorithms == ({"name": "smoothquant", "alpha": 0.6, "targets": "norm"},)
    assert QuantizerConfig.from_yaml(cfg.to_yaml()) == cfg
    assert parse_algorithm("smoothquant:alpha=0.3,targets=all").options == {"alpha": 0.3, "targets": "all"}
    with pytest.raises(ConfigError, match="unknown algorithm 'smoothquan'.*did you mean 'smoothquant'"):
        QuantizerConfig(algorithms=["smoothquan"])
    with pytest.raises(ConfigError, match=r"alpha must be in \[0, 1\]"):
        parse_algorithm("smoothquant:alpha=2")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_algorithm("smoothquant:beta=1")
    with pytest.raises(ConfigError, match="key=value"):
        parse_algorithm("smoothquant:alpha")
    path = _block(tmp_path / "b.onnx", residual=False)
    with pytest.raises(ConfigError, match="need calibration data"):
        qdq.quantize(path, dataclasses.replace(preset("w8"), algorithms=["smoothquant"]), progress=False)
    with pytest.raises(DataError, match="batches are empty"):
        q = Quantizer(path, "int8-smoothquant")
        q.apply_algorithms([])
    # CLI: --algorithm appends to the preset's
    np.save(tmp_path / "calib.npy", np.concatenate(_data()))
    from qdq.cli import main

    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(tmp_path / "calib.npy"),
                 "--algorithm", "smoothquant:alpha=0.5", "--quiet"]) == 0
    assert main(["quantize", str(path), "-o", str(tmp_path / "q2.onnx"), "--calib-data", str(tmp_path / "calib.npy"),
                 "--algorithm", "smooth", "--quiet"]) == 2


def test_float16_model_gets_float16_batches(tmp_path: Path) -> None:
    """Algorithms run on the model's own input dtypes: a float16 block calibrated with float32 arrays (converted
    as calibration converts them) is smoothed and quantized, not refused by onnxruntime as float32 input."""
    from onnx import numpy_helper as nh

    proto = onnx.load(_block(tmp_path / "fp32.onnx", residual=False))
    for init in proto.graph.initializer:
        init.CopyFrom(nh.from_array(nh.to_array(init).astype(np.float16), init.name))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(proto, tmp_path / "fp16.onnx")
    data = _data()
    out = tmp_path / "q.onnx"
    qdq.quantize(tmp_path / "fp16.onnx", "int8-smoothquant", data, output=out, progress=False)
    x = data[0].astype(np.float16)
    ref, got = _run(tmp_path / "fp16.onnx", x)[0], _run(out, x)[0]
    assert got.dtype == np.float16
    assert _sqnr(ref.astype(np.float32), got.astype(np.float32)) > 25
