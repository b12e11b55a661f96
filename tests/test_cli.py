"""The qdq command line: exit codes, one-line errors, YAML configs, streaming memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from qdq.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def calib_npy(tmp_path, digits_data) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, digits_data[0][:256])
    return path


YAML = textwrap.dedent("""
    global_config:
      op_state_spec:
        "*": {dtype: int8, granularity: {type: per_channel}}
      op_input_spec:
        "*": {dtype: int8, qparam_calculator_cls: global_minmax}
      op_output_spec:
        "*": {dtype: int8, qparam_calculator_cls: global_minmax}
    op_type_configs:
      Gemm: null
    op_name_configs:
      node_conv2d_2:
        op_state_spec:
          weight: {dtype: int4, granularity: {type: per_channel}}
""")


def test_quantize_with_yaml_config(capsys, tmp_path, digits_onnx, calib_npy) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(YAML)
    out = tmp_path / "q.onnx"
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", str(out), "--calib-data", str(calib_npy),
                        "--config", str(cfg))
    assert code == 0, err
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert gemm.input[1] in floats  # Gemm: None leaves its weight float (its input is ReduceMean's output pair)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert int4, "conv3's weight is stored as int4"


@pytest.mark.parametrize("yaml_text, needle", [
    ("global_cfg: {}\n", "unknown config key"),
    ("op_name_configs:\n  node_Conv_99: null\n", "matches no node in the model; close matches"),
    ("op_type_configs:\n  Convolution: null\n", "matches no op type"),
    ("global_config:\n  op_input_spec:\n    '*': {dtype: int9}\n", "int9"),
    ("global_config: [1\n", "not valid YAML"),
])
def test_config_errors_exit_2_one_line(capsys, tmp_path, digits_onnx, calib_npy, yaml_text, needle) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", str(tmp_path / "q.onnx"),
                        "--calib-data", str(calib_npy), "--config", str(cfg))
    assert code == 2
    assert err.startswith("qdq: error:") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "q.onnx").exists()


def test_data_and_model_errors_exit_1(capsys, tmp_path, digits_onnx) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(empty))
    assert code == 1 and err.startswith("qdq: error:") and "empty" in err
    bad = tmp_path / "bad.onnx"
    bad.write_text("garbage")
    code, _, err = _run(capsys, "quantize", str(bad), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(empty))
    assert code == 1 and "not a readable ONNX model" in err
    nan = tmp_path / "nan.npy"
    arr = np.zeros((4, 1, 8, 8), np.float32)
    arr[2, 0, 0, 0] = np.inf
    np.save(nan, arr)
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(nan))
    assert code == 1 and ("NaN" in err or "Inf" in err)


def test_usage_errors_exit_2(capsys, digits_onnx) -> None:
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(digits_onnx)])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("qdq: error:")
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", "x.onnx", "--calib-data", "x.npy", "--preset", "int9")
    assert code == 2 and "unknown preset" in err


def test_backend_capability_error_names_tensors(capsys, tmp_path, digits_onnx, calib_npy) -> None:
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", str(tmp_path / "q.onnx"), "--calib-data",
                        str(calib_npy), "--preset", "fp8", "--backend", "coreml")
    assert code == 1 and "coreml does not support float8_e4m3fn" in err and "conv1.weight" in err
    assert not (tmp_path / "q.onnx").exists()


def test_compare_reports_sqnr_agreement_and_layers(capsys, tmp_path, digits_onnx, calib_npy, digits_data) -> None:
    out = tmp_path / "q.onnx"
    assert _run(capsys, "quantize", str(digits_onnx), "-o", str(out), "--calib-data", str(calib_npy))[0] == 0
    data, labels = tmp_path / "test.npy", tmp_path / "labels.npy"
    np.save(data, digits_data[2])
    np.save(labels, digits_data[3])
    code, text, err = _run(capsys, "compare", str(digits_onnx), str(out), "--data", str(data), "--labels",
                           str(labels), "--per-layer")
    assert code == 0, err
    assert "SQNR" in text and "agree" in text and "relu_1" in text


def test_calibration_memory_is_flat(tmp_path) -> None:
    """Peak RSS for 512 samples stays within 50 MB of 64 samples (data streamed, statistics only)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 96, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 96, 96])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    data = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(512, 3, 96, 96))
    data[:] = rng.standard_normal(data.shape).astype(np.float32)
    del data
    script = ("import resource, sys; from qdq.cli import main; "
              "code = main(sys.argv[1:]); assert code == 0, code; "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = {}
    for n in (64, 512):  # 512 samples: 57 MB of input, 600 MB of activations if they were kept
        res = subprocess.run([sys.executable, "-c", script, "--quiet", "quantize", str(tmp_path / "m.onnx"), "-o",
                              str(tmp_path / f"q{n}.onnx"), "--calib-data", str(tmp_path / "x.npy"),
                              "--num-samples", str(n), "--batch-size", "16"],
                             capture_output=True, text=True, check=True)
        peaks[n] = int(res.stdout.split()[-1]) / 1024
    assert peaks[512] - peaks[64] < 50, peaks
