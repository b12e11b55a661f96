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
    ("op_name_configs:\n  'node_Conv[': null\n", "not a valid regular expression (unterminated character set"),
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


# ----------------------------------------------------------------------------- one behaviour on every path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str, *words: str) -> None:
    assert err.startswith("qdq: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_before_or_after_the_command_and_quiet_is_silent(capfd, tmp_path, digits_onnx, calib_npy,
                                                                         where) -> None:
    args = ["quantize", str(digits_onnx), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib_npy)]
    argv = ["--quiet", *args] if where == "before" else [*args, "--quiet"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # no progress bar, no "wrote" line, no warning, nothing from onnxruntime
    assert main(args) == 0  # without --quiet: the summary line
    assert capfd.readouterr().out.startswith(f"wrote {tmp_path / 'q.onnx'}")


def test_version_and_help_list_the_global_options(capsys) -> None:
    import qdq

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"qdq {qdq.__version__}"
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert "--quiet" in text and "--debug" in text and "--calib-data" in text


def test_cli_python_api_and_demo_write_the_same_model(capsys, tmp_path, digits_onnx, digits_data) -> None:
    import qdq
    from qdq.demo import ptq_rows

    x = digits_data[0][:256]
    np.save(tmp_path / "calib.npy", x)
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", str(tmp_path / "cli.onnx"), "--calib-data",
                        str(tmp_path / "calib.npy"), "--preset", "w4", "--batch-size", "16")
    assert code == 0, err
    qdq.save(qdq.quantize(digits_onnx, "w4", str(tmp_path / "calib.npy"), batch_size=16, progress=False),
             tmp_path / "api.onnx")
    demo = tmp_path / "demo"
    demo.mkdir()
    ptq_rows(digits_onnx, lambda: (x[i:i + 16] for i in range(0, 256, 16)), digits_data[2][:32],
             digits_data[3][:32], configs={"w4": "w4"}, out_dir=demo, progress=False)
    cli = (tmp_path / "cli.onnx").read_bytes()
    assert cli == (tmp_path / "api.onnx").read_bytes() == (demo / "w4-1.onnx").read_bytes()


def _conv_biases(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[2]] for n in convs if len(n.input) > 2 and n.input[2] in inits}


@pytest.mark.parametrize("name", ["w4", "w8"])
def test_weight_only_presets_use_calibration_data_for_bias_correction(capsys, tmp_path, digits_onnx, calib_npy,
                                                                       name) -> None:
    with_data, without = tmp_path / "with.onnx", tmp_path / "without.onnx"
    code, _, err = _run(capsys, "quantize", str(digits_onnx), "-o", str(with_data), "--calib-data", str(calib_npy),
                        "--preset", name)
    assert code == 0, err
    assert main(["quantize", str(digits_onnx), "-o", str(without), "--preset", name]) == 0  # data is optional
    err = capsys.readouterr().err
    assert err.count("bias correction skipped") == 1 and "--calib-data" in err  # warned once
    corrected, plain = _conv_biases(with_data), _conv_biases(without)
    fp32 = _conv_biases(digits_onnx)
    assert plain.keys() == corrected.keys() == fp32.keys() and fp32
    for node in fp32:
        np.testing.assert_array_equal(plain[node], fp32[node])  # no data: biases unchanged
    assert any(not np.array_equal(corrected[n], fp32[n]) for n in fp32)  # data: the channel means were used


def test_calibrator_keeps_every_other_setting(capsys, tmp_path, digits_onnx, calib_npy) -> None:
    from qdq.config_edit import with_activation_calculator
    from qdq.presets import preset

    cfg = with_activation_calculator(preset("int8"), "global_minmax")
    assert cfg == preset("int8-global-minmax") and cfg.bias_correction
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _run(capsys, "quantize", str(digits_onnx), "-o", str(a), "--calib-data", str(calib_npy),
                "--calibrator", "global_minmax")[0] == 0
    assert _run(capsys, "quantize", str(digits_onnx), "-o", str(b), "--calib-data", str(calib_npy),
                "--preset", "int8-global-minmax")[0] == 0
    assert a.read_bytes() == b.read_bytes()
    yaml_cfg = tmp_path / "cfg.yaml"
    yaml_cfg.write_text(YAML + "bias_correction: true\n")
    from qdq.config import QuantizerConfig

    kept = with_activation_calculator(QuantizerConfig.from_yaml(yaml_cfg), "percentile")
    assert kept.bias_correction and kept.op_type_configs["Gemm"] is None
    assert kept.op_name_configs["node_conv2d_2"].op_state_spec["weight"].dtype.value == "int4"


# ----------------------------------------------------------------------------- validate first, then work


def _argv(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "-o", str(out), "--calib-data", str(data), *extra]


@pytest.mark.parametrize("case, code, words", [
    ("batch-size-0", 2, ["--batch-size", ">= 1"]),
    ("num-samples-0", 2, ["--num-samples", ">= 1"]),
    ("std-0", 2, ["std", "0"]),
    ("mean-count", 2, ["mean", "3"]),
    ("output-unwritable", 2, ["/proc", "choose another -o"]),
    ("output-symlink-to-input", 2, ["-o", "input"]),
    ("output-is-the-data", 2, ["-o", "calib.npy", "input"]),
    ("fp8-on-coreml", 1, ["coreml does not support float8_e4m3fn", "conv1.weight"]),
])
def test_user_mistakes_fail_before_any_work(capsys, tmp_path, digits_onnx, digits_data, case, code, words) -> None:
    work = tmp_path / "work"
    work.mkdir()
    model = work / "m.onnx"
    model.write_bytes(digits_onnx.read_bytes())
    data = work / "calib.npy"
    x = digits_data[0][:64].copy()
    x[-1, 0, 0, 0] = np.nan  # had calibration run, the error would be about the NaN
    np.save(data, x)
    out = tmp_path / "q.onnx"
    extra = {"batch-size-0": ["--batch-size", "0"], "num-samples-0": ["--num-samples", "0"],
             "std-0": ["--std", "0"], "mean-count": ["--mean", "0.5,0.5"],
             "fp8-on-coreml": ["--preset", "fp8", "--backend", "coreml"]}.get(case, [])
    if case == "output-unwritable":
        out = Path("/proc/qdq-test-q.onnx")  # not writable, even for root
    if case == "output-symlink-to-input":
        out = tmp_path / "link.onnx"
        out.symlink_to(model)
    if case == "output-is-the-data":
        out = work / "sub" / ".." / "calib.npy"  # another spelling of the calibration file
        (work / "sub").mkdir()
    before = _files(work)
    try:
        got = main(["--quiet", *_argv(model, out, data, *extra)])
    except SystemExit as exc:  # argparse-level range checks exit from the parser
        got = exc.code
    err = capsys.readouterr().err
    assert got == code, err
    _one_error_line(err, *words)
    assert "nan" not in err.lower()
    assert _files(work) == before  # input model and data unchanged, nothing written beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["work"] + (["link.onnx"] if out.is_symlink()
                                                                               else []))


def test_python_api_range_checks_and_missing_data(digits_onnx) -> None:
    import qdq

    with pytest.raises(qdq.ConfigError, match="batch_size"):
        qdq.quantize(digits_onnx, "int8", [np.zeros((2, 1, 8, 8), np.float32)], batch_size=0)
    with pytest.raises(qdq.ConfigError, match="quantizes activations: pass calibration data"):
        qdq.quantize(digits_onnx, "int8")


def test_input_model_and_data_are_never_modified(capsys, tmp_path, digits_onnx, calib_npy) -> None:
    import hashlib

    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (digits_onnx, calib_npy)}
    assert _run(capsys, *_argv(digits_onnx, tmp_path / "q.onnx", calib_npy))[0] == 0
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest


# ----------------------------------------------------------------------------- signals


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory) -> Path:
    """2000 one-sample .npy files: at --batch-size 1 calibration takes seconds (time to send a signal)."""
    folder = tmp_path_factory.mktemp("slow") / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2000):
        np.save(folder / f"{i:05d}.npy", rng.standard_normal((1, 1, 8, 8)).astype(np.float32))
    return folder


@pytest.mark.parametrize("sig, code", [(2, 130), (15, 143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.usefixtures("sigint_for_children")
def test_signal_keeps_the_previous_output_and_leaves_no_temp_files(tmp_path, digits_onnx, slow_data, sig,
                                                                   code) -> None:
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "q.onnx"
    out.write_bytes(b"previous result")
    proc = subprocess.Popen([sys.executable, "-m", "qdq.cli", "quantize", str(digits_onnx), "-o", str(out),
                             "--calib-data", str(slow_data), "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # the progress bar on stderr shows calibration started; read until it does
        seen = ""
        while "calibrating" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stderr.read(1)
        assert proc.poll() is None, f"qdq finished before the signal: {seen}"
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, seen + rest
    lines = [line.strip() for line in (seen + rest).replace("\r", "\n").splitlines() if "qdq: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("qdq: error: interrupted"), rest  # one line, after the bar
    assert "Traceback" not in rest
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx"] and out.read_bytes() == b"previous result"


def test_nothing_to_quantize_is_said(capsys, tmp_path) -> None:
    """A model with no weight and no op the config quantizes (a Softmax) is written unchanged, and the summary and a
    warning say so (it used to print a kernel format as if it were quantized). Data a config does not need is still
    checked when there is something to quantize."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.zeros((4, 5), np.float32))
    code = main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                 "--calib-data", str(tmp_path / "x.npy"), "--preset", "w8"])
    out, err = capsys.readouterr()
    assert code == 0 and "nothing quantized: the same model" in out and "nothing to quantize" in err
    np.save(tmp_path / "bad.npy", np.zeros((4, 7), np.float32))
    w = onnx.numpy_helper.from_array(np.ones((5, 5), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "mm.onnx")
    code, _, err = _run(capsys, "quantize", str(tmp_path / "mm.onnx"), "-o", str(tmp_path / "q2.onnx"),
                        "--calib-data", str(tmp_path / "bad.npy"), "--preset", "w8")
    assert code == 1 and "dim 1 must be 5" in err and not (tmp_path / "q2.onnx").exists()


def test_summary_counts_quantized_ops(capsys, tmp_path, digits_onnx, calib_npy) -> None:
    code = main(["quantize", str(digits_onnx), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib_npy)])
    assert code == 0 and " ops read quantized tensors" in capsys.readouterr().out
