"""qdq report: isolated vs accumulated per-layer error, qparams, profiling, a page that opens in a real browser."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

import qdq
from qdq.errors import ConfigError, ModelError
from qdq.report import build_report, write_report


@pytest.fixture(scope="module")
def digits_report(digits_onnx, digits_data, tmp_path_factory):
    x_tr, _, x_te, y_te = digits_data
    out = tmp_path_factory.mktemp("report") / "int8.onnx"
    qdq.quantize(digits_onnx, "int8", [x_tr[:256]], output=out, progress=False)
    return out, build_report(digits_onnx, out, x_te[:200], labels=y_te[:200], progress=False)


def test_layers_isolated_and_accumulated(digits_report, digits_onnx) -> None:
    _, report = digits_report
    names = [r.name for r in report.layers]
    convs = [r for r in report.layers if r.op_type == "Conv"]
    assert len(convs) == 3 and any(r.op_type == "Gemm" for r in report.layers), names
    assert report.skipped == []
    first = report.layers[0]
    # the first layer reads the model input: alone or in the whole model, it sees the same quantized input
    assert first.isolated_db == pytest.approx(first.accumulated_db, abs=1e-6)
    later = report.layers[1:]
    assert all(20 < r.isolated_db < 80 for r in report.layers)
    assert sum(r.isolated_db > r.accumulated_db for r in later) >= len(later) - 1  # error accumulates
    assert all(r.quant_ms is not None for r in convs)  # fused kernels matched by name
    assert report.outputs[0].quant_accuracy is not None and report.num_samples == 200
    acts = {a.tensor: a for a in report.activations}
    assert "x" in acts and acts["x"].clip_ratio == 0.0 and acts["x"].hist.sum() == acts["x"].count > 0


def test_a_layer_quantized_alone_has_no_isolated_error_elsewhere(digits_onnx, digits_data, tmp_path: Path) -> None:
    """Only the last Conv quantized: its isolated error is the whole model's error at its output."""
    import onnx_ir as ir

    x_tr, _, x_te, _ = digits_data
    convs = [n.name for n in ir.load(digits_onnx).graph if n.op_type == "Conv"]
    spec = {"dtype": "int8"}
    cfg = {"global_config": None, "op_name_configs": {convs[-1]: {
        "op_state_spec": {"weight": {"dtype": "int8", "granularity": {"type": "per_channel"}}},
        "op_input_spec": {"*": spec}, "op_output_spec": None}}}
    out = tmp_path / "one.onnx"
    qdq.quantize(digits_onnx, cfg, [x_tr[:128]], output=out, progress=False)
    report = build_report(digits_onnx, out, x_te[:64], progress=False)
    assert [r.name for r in report.layers] == [convs[-1]]
    r = report.layers[0]
    assert r.isolated_db == pytest.approx(r.accumulated_db, abs=1e-6) and np.isfinite(r.isolated_db)


def test_fp8_model_finalized_as_casts_is_reported_like_its_qdq_pairs(digits_onnx, digits_data, tmp_path: Path) -> None:
    """A finalized fp8 model computes its float8 activations as Div/Cast/Cast/Mul (no DequantizeLinear): report and
    per-layer compare analyse them as the pairs they replaced, with the numbers of the prepared QDQ model."""
    from qdq.quantizer import Quantizer
    from qdq.validate import compare

    x_tr, _, x_te, _ = digits_data
    q = Quantizer(digits_onnx, "fp8")
    q.prepare()
    q.calibrate([x_tr[:256]], progress=False)
    final, prepared = tmp_path / "fp8.onnx", tmp_path / "fp8.prepared.onnx"
    qdq.save(q.finalize(), final)
    qdq.save(q.qdq_model(), prepared)
    assert "DequantizeLinear" not in {n.op_type for n in onnx.load(final).graph.node if n.input[0] not in
                                      {i.name for i in onnx.load(final).graph.initializer}}
    report = build_report(digits_onnx, final, x_te[:64], progress=False)
    want = build_report(digits_onnx, prepared, x_te[:64], progress=False)
    assert [r.name for r in report.layers] == [r.name for r in want.layers] and len(report.layers) >= 4
    assert report.skipped == want.skipped == []  # the quantized graph output's layer too (metadata stripped)
    for got, ref in zip(report.layers, want.layers):
        assert got.isolated_db == pytest.approx(ref.isolated_db, abs=1e-6)
        assert got.accumulated_db == pytest.approx(ref.accumulated_db, abs=1e-6)
    layers = compare(digits_onnx, final, x_te[:64], per_layer=True, progress=False).layers
    ref_layers = compare(digits_onnx, prepared, x_te[:64], per_layer=True, progress=False).layers
    assert [m.name for m in layers] == [m.name for m in ref_layers] and layers
    assert [m.sqnr_db for m in layers] == pytest.approx([m.sqnr_db for m in ref_layers], abs=1e-6)


def test_transformer_layers_through_fused_kernels_and_smoothquant(attention_onnx, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, 8, 16)).astype(np.float32) for _ in range(4)]
    out = tmp_path / "att.onnx"
    qdq.quantize(attention_onnx, "int8-smoothquant", calib, output=out, progress=False)
    report = build_report(attention_onnx, out, calib, progress=False)
    assert report.skipped == []
    assert len([r for r in report.layers if "MatMul" in r.op_type]) == 6  # q, k, v, scores, context, out
    assert any(r.op_type == "MatMulIntegerToFloat" for r in report.layers)
    assert all(np.isfinite(r.isolated_db) and r.isolated_db > 15 for r in report.layers)


def test_cli_writes_html_and_md_atomically(digits_onnx, digits_data, tmp_path: Path) -> None:
    from qdq.cli import main

    x_tr, _, x_te, y_te = digits_data
    quant = tmp_path / "q.onnx"
    qdq.quantize(digits_onnx, "int8", [x_tr[:128]], output=quant, progress=False)
    np.save(tmp_path / "x.npy", x_te[:64])
    np.save(tmp_path / "y.npy", y_te[:64])
    common = [str(digits_onnx), str(quant), "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
              "--quiet"]
    assert main(["report", *common, "-o", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| op name | op type | isolated SQNR dB |" in md and "node_linear" in md
    assert main(["report", *common, "-o", str(tmp_path / "r.pdf")]) == 2
    assert not (tmp_path / "r.pdf").exists()
    assert main(["report", str(digits_onnx), str(digits_onnx), "--data", str(tmp_path / "x.npy"), "--quiet",
                 "-o", str(tmp_path / "same.html")]) == 1  # no quantized layer: one line, nothing written
    assert not (tmp_path / "same.html").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ModelError, match="not found"):
        build_report(tmp_path / "missing.onnx", quant, x_te[:8], progress=False)
    with pytest.raises(ModelError, match=".html or .md"):
        write_report(build_report(digits_onnx, quant, x_te[:8], progress=False), tmp_path / "r.txt")
    assert ConfigError  # the CLI's suffix check raises it (exit 2 above)


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


def test_report_page_opens_in_headless_chromium(digits_report, tmp_path: Path) -> None:
    """The page loads in a real browser, its embedded plot decodes (the page records the image's pixel width on
    the body once loaded) and the layer table is in the DOM."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("QDQ_REQUIRE_BROWSER"):
            pytest.fail("QDQ_REQUIRE_BROWSER is set but no chromium is installed (Debian package chromium)")
        pytest.skip("no headless browser here: install the Debian package chromium (.ci/run does)")
    _, report = digits_report
    page = write_report(report, tmp_path / "report.html")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'id="layer-table"' in dom and "node_linear" in dom
    width = dom.split('data-plot-width="', 1)[1].split('"', 1)[0]
    assert int(width) > 200  # the PNG decoded (0 if broken)
    assert dom.count("<img") >= 2  # the plot and the histogram thumbnails


@pytest.mark.parametrize("preset", ["int8", "fp8"])
def test_a_layer_writing_the_graph_output_is_reported(tmp_path: Path, preset: str) -> None:
    """The quantized graph output's float tensor is renamed and finalize strips the metadata naming it: the layer
    is found through its output pair's DequantizeLinear (a one-Conv model used to have no layer at all)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")])
    fp32 = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), fp32)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    out = tmp_path / "q.onnx"
    qdq.quantize(fp32, preset, [x], output=out, progress=False)
    report = build_report(fp32, out, x, progress=False)
    assert [r.name for r in report.layers] == ["conv"] and report.skipped == []
    assert 20 < report.layers[0].isolated_db < 60


@pytest.mark.parametrize("weight_shape", [(16,), (2, 16, 4)])
def test_matmul_with_a_vector_or_batched_weight(tmp_path: Path, weight_shape: tuple[int, ...]) -> None:
    """A MatMul weight that is not 2-D gets one scale (per output column would run along the summed axis of a
    vector, and onnxruntime's fused integer MatMul fails at run time on either); the model runs optimized, and
    the report handles its 0-d output."""
    from onnx import TensorProto, helper, numpy_helper

    from qdq.session import make_session

    rng = np.random.default_rng(0)
    out_shape = [] if len(weight_shape) == 1 else [2, "N", 4]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 16] if out_shape else [16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(rng.normal(0, 0.3, weight_shape).astype(np.float32), "b")])
    fp32 = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), fp32)
    x = rng.standard_normal((8, 16) if out_shape else (16,)).astype(np.float32)
    out = tmp_path / "q.onnx"
    qdq.quantize(fp32, "int8", [x], output=out, progress=False)
    scale = next(t for t in onnx.load(out).graph.initializer if t.name.startswith("b") and "scale" in t.name)
    assert list(scale.dims) == []
    got = make_session(out, level="all").run(None, {"a": x})[0]
    want = make_session(fp32).run(None, {"a": x})[0]
    assert got.shape == want.shape and np.allclose(got, want, atol=0.05 * float(np.abs(want).max()) + 1e-3)
    report = build_report(fp32, out, [x], progress=False)
    assert [r.name for r in report.layers] == ["mm"] and report.layers[0].isolated_db > 25
