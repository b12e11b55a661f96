"""onnxruntime kernel format: int8 weights (U8S8) or uint8 weights (U8U8), chosen by the CPU when "auto".

On x86 without VNNI/AMX onnxruntime's U8S8 kernels add product pairs in saturating int16; with an int8
model's uint8 activations (values around the zero point 128) EfficientNet-Lite0 fell to 8 dB there. uint8
weights (code + 128, zero point + 128) run on its U8U8 kernels, which do not saturate, and change no value.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq
from qdq.backends import host_cpu
from qdq.backends.ort_inspect import float_compute_nodes, optimized_op_counts
from qdq.cli import main
from qdq.errors import ConfigError
from qdq.passes.weights_to_uint8 import weights_to_uint8
from qdq.quantizer import Quantizer, finalize_model


def _run(model: ir.Model, feeds: dict[str, np.ndarray], level: str) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    opts.log_severity_level = 3
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _weight_dtypes(model: ir.Model) -> set[ir.DataType]:
    """dtypes of the integer weights read by Conv / Gemm / MatMul through a DequantizeLinear."""
    out = set()
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1:
            dq = node.inputs[1].producer()
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value is not None:
                out.add(dq.inputs[0].dtype)
    return out


def _model(nodes: list, inits: list, x: tuple[str, int, list[int]]) -> ir.Model:
    """An opset-21 model of ``nodes`` / ``inits`` with one input ``x`` = (name, TensorProto dtype, shape), output y."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.fixture(scope="module")
def digits_q(digits_onnx, digits_data) -> Quantizer:
    x = digits_data[0][:256]
    q = Quantizer(digits_onnx, "int8")
    prepared = q.prepare(x[:2])
    with q.calibration_mode():
        for i in range(0, len(x), 64):
            prepared(x[i:i + 64])
    return q


def test_both_formats_are_integer_kernels_with_the_same_values(digits_q, digits_data) -> None:
    x = digits_data[2][:200]
    s8 = finalize_model(digits_q.qdq_model(), "onnxruntime", kernel_format="u8s8")
    u8 = finalize_model(digits_q.qdq_model(), "onnxruntime", kernel_format="u8u8")
    assert _weight_dtypes(s8) == {ir.DataType.INT8} and _weight_dtypes(u8) == {ir.DataType.UINT8}
    for node in u8.graph:  # every converted weight: zero point 128 (its int8 zero point + 128)
        if node.op_type == "DequantizeLinear" and node.inputs[0].dtype == ir.DataType.UINT8 \
                and node.inputs[0].const_value is not None and node.inputs[0].const_value.size > 16:
            assert np.all(node.inputs[2].const_value.numpy() == 128), node.name
    # reference semantics: bit-identical outputs
    ref = _run(s8, {"x": x}, "none")
    assert np.array_equal(_run(u8, {"x": x}, "none").view(np.uint32), ref.view(np.uint32))
    for model in (s8, u8):  # both fuse every Conv / Add / Gemm into an integer kernel
        counts = optimized_op_counts(model)
        assert counts["QLinearConv"] == 3 and counts["QGemm"] == 1 and counts["QLinearAdd"] == 1, counts
        assert float_compute_nodes(model) == []
    # the integer kernels of u8u8 agree with the reference on every CPU
    fused = _run(u8, {"x": x}, "all")
    scale = float(np.abs(ref).max())
    assert np.mean(np.abs(fused - ref) <= 1e-3 * scale) >= 0.99, float(np.abs(fused - ref).max())
    assert (fused.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_auto_follows_the_cpu(digits_q, monkeypatch) -> None:
    for saturates, dtype in ((True, ir.DataType.UINT8), (False, ir.DataType.INT8)):
        monkeypatch.setattr(host_cpu, "u8s8_saturates", lambda s=saturates: s)
        assert host_cpu.resolve_kernel_format("auto") == ("u8u8" if saturates else "u8s8")
        assert _weight_dtypes(finalize_model(digits_q.qdq_model(), "onnxruntime")) == {dtype}
        assert _weight_dtypes(digits_q.finalize("onnxruntime", kernel_format="auto")) == {dtype}


@pytest.mark.parametrize(("machine", "flags", "saturates"), [
    ("x86_64", {"sse2", "avx2", "fma"}, True),  # AVX2 only: VPMADDUBSW into int16
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, True),  # AVX-512 without VNNI: the same instruction
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("x86_64", {"avx2", "amx_int8"}, False),
    ("x86_64", None, True),  # flags unreadable: the safe answer on x86
    ("aarch64", None, False),  # ARM's SDOT kernels are exact
    ("arm64", {"asimd"}, False),
])
def test_which_cpus_saturate(monkeypatch, machine, flags, saturates) -> None:
    host_cpu.u8s8_saturates.cache_clear()
    monkeypatch.setattr(host_cpu.platform, "machine", lambda: machine)
    monkeypatch.setattr(host_cpu, "_cpu_flags", lambda: flags)
    try:
        assert host_cpu.u8s8_saturates() is saturates
    finally:
        host_cpu.u8s8_saturates.cache_clear()


def test_bad_format_and_wrong_backend_are_one_line_errors(digits_q) -> None:
    with pytest.raises(ConfigError, match="kernel_format must be one of auto, u8s8, u8u8"):
        finalize_model(digits_q.qdq_model(), "onnxruntime", kernel_format="s8s8")
    with pytest.raises(ConfigError, match="onnxruntime option"):
        finalize_model(digits_q.qdq_model(), "coreai", kernel_format="u8u8")


def test_weight_only_models_keep_int8_weights(digits_onnx) -> None:
    """w8: no activation is quantized, so no integer kernel runs and nothing is converted."""
    q = Quantizer(digits_onnx, "w8")
    q.prepare()
    final = finalize_model(q.qdq_model(), "onnxruntime", kernel_format="u8u8")
    assert _weight_dtypes(final) == {ir.DataType.INT8}


def test_a_zero_point_shared_with_a_float_input_matmul_is_split() -> None:
    """Two MatMuls share the weight zero point; only the one with a quantized input converts."""
    k, n = 8, 4
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "wa"),
             numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "wb"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wzp"),
             numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wa", "ws", "wzp"], ["wad"], axis=1),
             helper.make_node("DequantizeLinear", ["wb", "ws", "wzp"], ["wbd"], axis=1),
             helper.make_node("MatMul", ["xd", "wad"], ["ya"]),
             helper.make_node("MatMul", ["x", "wbd"], ["yb"]),
             helper.make_node("Add", ["ya", "yb"], ["y"])]
    model = _model(nodes, inits, ("x", TensorProto.FLOAT, [3, k]))
    x = rng.standard_normal((3, k)).astype(np.float32)
    want = _run(model, {"x": x}, "none")
    assert weights_to_uint8(model) == 1
    inits_now = model.graph.initializers
    assert inits_now["wa"].dtype == ir.DataType.UINT8 and inits_now["wb"].dtype == ir.DataType.INT8
    assert inits_now["wzp"].dtype == ir.DataType.INT8  # still read by wb's DequantizeLinear
    dq_a = next(n for n in model.graph if n.outputs[0].name == "wad")
    assert dq_a.inputs[2].dtype == ir.DataType.UINT8 and np.all(dq_a.inputs[2].const_value.numpy() == 128)
    assert np.array_equal(_run(model, {"x": x}, "none"), want)


def test_cli_kernel_format(capsys, tmp_path: Path, digits_onnx, digits_data) -> None:
    data = tmp_path / "calib.npy"
    np.save(data, digits_data[0][:128])
    for fmt, dtype in (("u8s8", ir.DataType.INT8), ("u8u8", ir.DataType.UINT8)):
        out = tmp_path / f"{fmt}.onnx"
        assert main(["--quiet", "quantize", str(digits_onnx), "-o", str(out), "--calib-data", str(data),
                     "--kernel-format", fmt]) == 0
        assert _weight_dtypes(ir.load(out)) == {dtype}
    code = main(["--quiet", "quantize", str(digits_onnx), "-o", str(tmp_path / "m.aimodel"), "--calib-data",
                 str(data), "--backend", "coreai", "--kernel-format", "u8u8"])
    err = capsys.readouterr().err
    assert code != 0 and "onnxruntime option" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.aimodel").exists()


def test_compare_warns_about_int8_weights_on_a_saturating_cpu(digits_q, digits_onnx, digits_data, monkeypatch,
                                                              caplog) -> None:
    from qdq.validate import compare

    x = digits_data[2][:64]
    caplog.set_level(logging.WARNING)  # the CLI tests leave the root logger at ERROR (--quiet)
    monkeypatch.setattr(host_cpu, "u8s8_saturates", lambda: True)
    for fmt, warned in (("u8s8", True), ("u8u8", False)):
        caplog.clear()
        model = finalize_model(digits_q.qdq_model(), "onnxruntime", kernel_format=fmt)
        compare(digits_onnx, model, [x], progress=False)
        hits = [r for r in caplog.records if "saturating int16" in r.getMessage()]
        assert len(hits) == (1 if warned else 0), (fmt, [r.getMessage() for r in caplog.records])
        if warned:
            assert "4 int8 weights" in hits[0].getMessage()  # 3 Conv + 1 Gemm


def test_seven_bit_weights_stay_int8() -> None:
    """Codes inside [-64, 63] cannot saturate (255 * 64 * 2 < 32768): that weight keeps the faster U8S8 kernel."""
    k, n = 8, 4
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(-64, 64, (k, n)).astype(np.int8), "w"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wzp"),
             numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xzp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    model = _model(nodes, inits, ("x", TensorProto.FLOAT, [3, k]))
    assert weights_to_uint8(model) == 0
    assert model.graph.initializers["w"].dtype == ir.DataType.INT8
    x = (rng.random((3, k)) * 12).astype(np.float32)  # uint8 codes near 255: the worst case for saturation
    np.testing.assert_allclose(_run(model, {"x": x}, "all"), _run(model, {"x": x}, "none"), rtol=1e-5, atol=1e-5)


def test_cli_summary_names_the_format(capsys, tmp_path: Path, digits_onnx, digits_data, monkeypatch) -> None:
    data = tmp_path / "calib.npy"
    np.save(data, digits_data[0][:64])
    monkeypatch.setattr(host_cpu, "u8s8_saturates", lambda: True)
    assert main(["quantize", str(digits_onnx), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(data)]) == 0
    assert "u8u8 kernels (this CPU's U8S8 kernels saturate)" in capsys.readouterr().out


def test_a_tied_table_gathered_as_integers_gets_a_uint8_copy_for_its_kernel() -> None:
    """The int8 table a Gather reads (GatherThenDequantize) is also a MatMul weight: the MatMul's
    DequantizeLinear reads a uint8 copy, the Gather keeps the int8 original; no value changes."""
    k, n = 8, 8
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "table"),
             numpy_helper.from_array(np.float32(0.02), "ts"), numpy_helper.from_array(np.int8(0), "tzp"),
             numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xzp")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows_q"]),
             helper.make_node("DequantizeLinear", ["rows_q", "ts", "tzp"], ["rows"]),
             helper.make_node("QuantizeLinear", ["rows", "xs", "xzp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["table", "ts", "tzp"], ["w"]),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    model = _model(nodes, inits, ("ids", TensorProto.INT64, [2, 3]))
    ids = rng.integers(0, k, (2, 3)).astype(np.int64)
    want = _run(model, {"ids": ids}, "none")
    assert weights_to_uint8(model) == 1
    gather = next(n for n in model.graph if n.op_type == "Gather")
    dq_w = next(n for n in model.graph if n.outputs[0].name == "w")
    assert gather.inputs[0].name == "table" and gather.inputs[0].dtype == ir.DataType.INT8
    assert dq_w.inputs[0].name == "table_uint8" and dq_w.inputs[0].dtype == ir.DataType.UINT8
    assert dq_w.inputs[2].dtype == ir.DataType.UINT8 and int(dq_w.inputs[2].const_value.numpy()) == 128
    got = _run(model, {"ids": ids}, "none")
    assert np.array_equal(got, want)
    np.testing.assert_allclose(_run(model, {"ids": ids}, "all"), want, rtol=1e-5, atol=1e-4)


def _shared_weight_model(second: str) -> tuple[ir.Model, ir.Model, dict[str, np.ndarray]]:
    """Gemm g0 (transB=1) reads W; ``second`` also reads W: "gemm" a Gemm transB=0 (another channel axis),
    "reshape" a Reshape -> MatMul. Returns the model, the same with W duplicated, and a batch."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (8, 8)).astype(np.float32)

    def build(shared: bool) -> ir.Model:
        w2 = "W" if shared else "W2"
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w, "W2"),
                 numpy_helper.from_array(np.array([8, 8], np.int64), "shape")]
        nodes = [helper.make_node("Gemm", ["x", "W"], ["a"], name="g0", transB=1)]
        if second == "gemm":
            nodes.append(helper.make_node("Gemm", ["a", w2], ["y"], name="g1", transB=0))
        else:
            nodes += [helper.make_node("Reshape", [w2, "shape"], ["w2r"], name="r"),
                      helper.make_node("MatMul", ["a", "w2r"], ["y"], name="mm")]
        return _model(nodes, inits, ("x", TensorProto.FLOAT, ["N", 8]))

    return build(True), build(False), {"x": rng.standard_normal((32, 8)).astype(np.float32)}


@pytest.mark.parametrize("second", ["gemm", "reshape"])
def test_a_shared_weight_is_as_accurate_as_two_copies_and_runs_uint8(second: str) -> None:
    """One weight read by two ops: with another channel axis each reader gets its own grid (it used to be quantized
    twice in a chain, the second Gemm on the first one's axis: 7.8 dB); read also by a Reshape, the kernel still gets
    uint8 codes (it used to stay int8: onnxruntime's saturating U8S8 kernel, 14 dB)."""
    shared, copies, feeds = _shared_weight_model(second)
    ref = _run(copies, feeds, "none")

    def quantized(model: ir.Model) -> ir.Model:
        q = Quantizer(model, qdq.preset("int8"))  # bias correction included: each reader on its own grid
        q.prepare()
        q.calibrate([feeds["x"]])
        return finalize_model(q.qdq_model(), "onnxruntime", kernel_format="u8u8")

    def sqnr(y: np.ndarray) -> float:
        return float(10 * np.log10((ref ** 2).sum() / ((ref - y) ** 2).sum()))

    q_shared, q_copies = quantized(shared), quantized(copies)
    assert ir.DataType.INT8 not in _weight_dtypes(q_shared)
    want = sqnr(_run(q_copies, feeds, "all"))
    assert want > 30
    for level in ("none", "all"):
        assert sqnr(_run(q_shared, feeds, level)) > want - 1.0
    assert not any(n.op_type == "QuantizeLinear" and n.inputs[0].producer() is not None
                   and n.inputs[0].producer().op_type == "DequantizeLinear" for n in q_shared.graph)  # no chain


def test_bias_correction_of_a_weight_on_two_grids_uses_each_readers_grid() -> None:
    """w4 (big rounding error, so the correction matters): with W shared by Gemm transB=1 and transB=0 the result
    equals that of two copies (bias correction used to take the last grid for every reader: 22.9 vs 26.4 dB)."""
    shared, copies, feeds = _shared_weight_model("gemm")
    ref = _run(copies, feeds, "none")
    outs = []
    for model in (shared, copies):
        q = Quantizer(model, qdq.preset("w4"))
        q.prepare()
        q.calibrate([feeds["x"]])
        outs.append(_run(finalize_model(q.qdq_model(), "onnxruntime"), feeds, "none"))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[0], ref, atol=1e-3)  # w4 did round
