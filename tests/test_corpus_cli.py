"""Corpus: bad YAML configs, out-of-range options, bad output paths, backend limits and signals.

Config and usage mistakes exit 2, backend limits exit 1, interrupts exit 130 (SIGINT) / 143 (SIGTERM);
always one ``qdq: error:`` line, nothing written, inputs untouched, and YAML never runs code.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from corpus_helpers import Words, assert_cli_error, assert_one_error_line, conv_model, run_cli, save_model, snapshot

Argv = list[str]


def _conv(d: Path) -> Path:
    return save_model(conv_model(), d / "conv.onnx")


def _calib(d: Path, n: int = 8) -> Path:
    path = d / "calib.npy"
    np.save(path, np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32))
    return path


def _images(d: Path) -> Path:
    from PIL import Image

    folder = d / "images"
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return folder


def _q(d: Path, *extra: str, data: Path | None = None, out: Path | None = None) -> Argv:
    """``quantize conv.onnx -o OUT --calib-data DATA EXTRA...`` with the model and data written into ``d``."""
    data = data if data is not None else _calib(d)
    out = out if out is not None else d / "q.onnx"
    return ["quantize", str(_conv(d)), "-o", str(out), "--calib-data", str(data), *extra]


# ----------------------------------------------------------------------------- YAML configs (exit 2)

#: id -> (YAML text with {marker} for the code-execution probe, key words of the error)
YAML_CASES: dict[str, tuple[str, Words]] = {
    "syntax-error": ("global_config: [1\n", ["yaml", "line"]),
    "tab-indentation": ("global_config:\n\top_input_spec: {}\n", ["yaml"]),
    "unknown-top-level-key": ("global_cfg: {}\n", ["global_cfg", "valid keys", "global_config"]),
    "unknown-module-key": ("global_config:\n  op_weight_spec: {}\n", ["op_weight_spec", "op_state_spec"]),
    "unknown-spec-key": ("global_config:\n  op_input_spec:\n    '*': {dtyp: int8}\n", ["dtyp", "dtype"]),
    "torch-module-key": ("module_type_configs: {}\n", ["module_type_configs", "op_type_configs"]),
    "bias-correction-not-bool": ("bias_correction: 'yes'\n", ["bias_correction"]),
    "global-config-is-number": ("global_config: 5\n", ["global_config"]),
    "spec-dict-is-string": ("global_config:\n  op_input_spec: int8\n", ["op_input_spec"]),
    "qat-schedule-is-number": ("qat_schedule: 5\n", ["qat_schedule"]),
    "learnable-scale-is-string": ("global_config:\n  op_input_spec:\n    '*': {learnable_scale: 'no'}\n",
                                  ["learnable_scale"]),
    "unknown-dtype": ("global_config:\n  op_input_spec:\n    '*': {dtype: int9}\n", ["int9", "int8"]),
    "unknown-calculator": ("global_config:\n  op_input_spec:\n    '*': {qparam_calculator_cls: global_minmx}\n",
                           ["global_minmx", "global_minmax"]),
    "unknown-granularity": ("global_config:\n  op_state_spec:\n    weight: {granularity: per_row}\n",
                            ["per_row", "per_channel"]),
    "unknown-qscheme": ("global_config:\n  op_input_spec:\n    '*': {qscheme: symetric}\n", ["symetric", "symmetric"]),
    "float-range-positive-min": ("global_config:\n  op_input_spec:\n    '*': {float_range: [1, 2]}\n",
                                 ["float_range"]),
    "float-range-strings": ("global_config:\n  op_input_spec:\n    '*': {float_range: [low, high]}\n",
                            ["float_range", "low"]),
    "block-size-one": ("global_config:\n  op_state_spec:\n    weight: {granularity: {type: per_block, block_size: 1}}\n",
                       ["block_size"]),
    "channel-axis-out-of-range": (("global_config:\n  op_state_spec:\n"
                                  "    weight: {granularity: {type: per_channel, axis: 7}}\n"), ["axis", "7"]),
    "calculator-kwarg-unknown": ("global_config:\n  op_input_spec:\n    '*': {calculator_kwargs: {averaging: 0.1}}\n",
                                 ["averaging", "averaging_constant"]),
    "op-name-matches-no-node": ("op_name_configs:\n  conv_1: null\n", ["conv_1", "conv1"]),
    "op-type-unknown": ("op_type_configs:\n  Convolution: null\n", ["Convolution", "Conv"]),
    "python-object-apply-tag": ('global_config: !!python/object/apply:os.system ["touch {marker}"]\n',
                                ["yaml", ("python/object", "tag")]),
    "python-name-tag": ("bias_correction: !!python/name:os.system\n", ["yaml", ("python/name", "tag")]),
    "empty-file": ("", ["cfg.yaml", "empty"]),
    "comments-only": ("# nothing here yet\n", ["cfg.yaml", "empty"]),
    "yaml-is-a-list": ("- global_config\n- op_type_configs\n", ["mapping", "list"]),
    "yaml-is-a-scalar": ("int8\n", ["mapping", ("--preset", "str")]),
}


@pytest.mark.parametrize("text, words", YAML_CASES.values(), ids=YAML_CASES.keys())
def test_bad_yaml_config(capfd, tmp_path: Path, text: str, words: Words) -> None:
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "pwned"
    cfg = work / "cfg.yaml"
    cfg.write_text(text.replace("{marker}", str(marker)))
    assert_cli_error(capfd, work, _q(work, "--config", str(cfg)), code=2, words=words, output=work / "q.onnx")
    assert not marker.exists(), "a YAML tag executed code"


def _cfg_missing(d: Path) -> Path:
    return d / "nothere.yaml"


def _cfg_directory(d: Path) -> Path:
    (d / "configs").mkdir()
    return d / "configs"


def _cfg_not_utf8(d: Path) -> Path:
    path = d / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    return path


CONFIG_FILE_CASES: dict[str, tuple[Callable[[Path], Path], Words]] = {
    "config-file-missing": (_cfg_missing, ["nothere.yaml", "not found"]),
    "config-is-a-directory": (_cfg_directory, ["configs"]),
    "config-not-utf8": (_cfg_not_utf8, ["binary.yaml"]),
}


@pytest.mark.parametrize("make, words", CONFIG_FILE_CASES.values(), ids=CONFIG_FILE_CASES.keys())
def test_bad_config_file(capfd, tmp_path: Path, make: Callable[[Path], Path], words: Words) -> None:
    cfg = make(tmp_path)
    assert_cli_error(capfd, tmp_path, _q(tmp_path, "--config", str(cfg)), code=2, words=words,
                     output=tmp_path / "q.onnx")


# ----------------------------------------------------------------------------- options out of range (exit 2)

#: id -> (argv builder, key words)
OPTION_CASES: dict[str, tuple[Callable[[Path], Argv], Words]] = {
    "batch-size-0": (lambda d: _q(d, "--batch-size", "0"), ["batch"]),
    "batch-size-negative": (lambda d: _q(d, "--batch-size", "-1"), ["batch"]),
    "batch-size-not-a-number": (lambda d: _q(d, "--batch-size", "many"), ["batch", "many"]),
    "num-samples-0": (lambda d: _q(d, "--num-samples", "0"), [("num-samples", "num_samples")]),
    "num-samples-negative": (lambda d: _q(d, "--num-samples", "-5"), [("num-samples", "num_samples")]),
    "image-size-0": (lambda d: _q(d, "--image-size", "0", data=_images(d)), [("image-size", "image_size")]),
    "std-0": (lambda d: _q(d, "--std", "0", data=_images(d)), ["std"]),
    "std-zero-channel": (lambda d: _q(d, "--std", "0.2,0,0.2", data=_images(d)), ["std"]),
    "mean-two-values-for-rgb": (lambda d: _q(d, "--mean", "0.5,0.5", data=_images(d)), ["mean", "3"]),
    "mean-not-numbers": (lambda d: _q(d, "--mean", "red,green,blue", data=_images(d)), ["mean"]),
    "unknown-preset": (lambda d: _q(d, "--preset", "int9"), ["int9", "int8"]),
    "unknown-backend": (lambda d: _q(d, "--backend", "tensorrt"), ["tensorrt", "onnxruntime"]),
    "unknown-calibrator": (lambda d: _q(d, "--calibrator", "percentil"), ["percentil", "percentile"]),
    "preset-and-config": (lambda d: _q(d, "--preset", "int8", "--config", str(d / "c.yaml")), ["--config"]),
    "missing-output-option": (lambda d: [a for a in _q(d) if a not in ("-o", str(d / "q.onnx"))], ["-o"]),
    "unknown-option": (lambda d: _q(d, "--bits", "4"), ["--bits"]),
    "unknown-command": (lambda d: ["quantise", str(_conv(d))], ["quantise"]),
    "activations-without-calib-data": (lambda d: _q(d)[:4], ["--calib-data"]),  # quantize M -o OUT
    "export-factory-malformed": (lambda d: ["export", "--model", "models.tiny", "-o", str(d / "q.onnx")],
                                 ["models.tiny", "module:factory"]),
    "export-factory-missing": (lambda d: ["export", "--model", "models.nothere:factory", "-o", str(d / "q.onnx")],
                               ["models.nothere"]),
    "inspect-bad-config": (lambda d: ["inspect", str(_conv(d)), "--config", str(d / "nothere.yaml")],
                           ["nothere.yaml"]),
}


@pytest.mark.parametrize("build, words", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_bad_option(capfd, tmp_path: Path, build: Callable[[Path], Argv], words: Words) -> None:
    assert_cli_error(capfd, tmp_path, build(tmp_path), code=2, words=words, output=tmp_path / "q.onnx")


def test_quiet_after_subcommand_keeps_errors_one_line(capfd, tmp_path: Path) -> None:
    """`--quiet` where the README puts it (after the subcommand) is accepted; the data error is still one line."""
    argv = ["quantize", str(_conv(tmp_path)), "-o", str(tmp_path / "q.onnx"), "--calib-data",
            str(tmp_path / "nothere.npy"), "--quiet"]
    before = snapshot(tmp_path)
    code, out, err = run_cli(capfd, argv)
    assert code == 1, err
    assert out == ""
    assert_one_error_line(err, ["nothere.npy"])
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- output paths (exit 2)


def _out_folder_missing(d: Path) -> tuple[Argv, Path]:
    out = d / "no_such_folder" / "q.onnx"
    return _q(d, out=out), out


def _out_parent_is_file(d: Path) -> tuple[Argv, Path]:
    (d / "notes.txt").write_text("a file, not a folder\n")
    out = d / "notes.txt" / "q.onnx"
    return _q(d, out=out), out


def _out_unwritable(d: Path) -> tuple[Argv, Path]:
    out = Path("/proc/qdq-corpus-q.onnx")  # writes fail here even for root
    return _q(d, out=out), out


def _out_is_directory(d: Path) -> tuple[Argv, Path]:
    out = d / "results"
    out.mkdir()
    return _q(d, out=out), out


def _out_is_input(d: Path) -> tuple[Argv, Path]:
    model = _conv(d)
    return ["quantize", str(model), "-o", str(model), "--calib-data", str(_calib(d))], model


def _out_is_input_relative(d: Path) -> tuple[Argv, Path]:
    model = _conv(d)
    other = d / "sub"
    other.mkdir()
    return ["quantize", str(model), "-o", str(other / ".." / model.name), "--calib-data", str(_calib(d))], model


def _out_symlink_to_input(d: Path) -> tuple[Argv, Path]:
    model = _conv(d)
    link = d / "link.onnx"
    link.symlink_to(model)
    return ["quantize", str(model), "-o", str(link), "--calib-data", str(_calib(d))], link


def _out_hardlink_to_input(d: Path) -> tuple[Argv, Path]:
    model = _conv(d)
    link = d / "hard.onnx"
    os.link(model, link)
    return ["quantize", str(model), "-o", str(link), "--calib-data", str(_calib(d))], link


OUTPUT_CASES: dict[str, tuple[Callable[[Path], tuple[Argv, Path]], Words]] = {
    "output-folder-missing": (_out_folder_missing, ["no_such_folder"]),
    "output-parent-is-a-file": (_out_parent_is_file, ["notes.txt"]),
    "output-folder-unwritable": (_out_unwritable, ["/proc"]),
    "output-is-a-directory": (_out_is_directory, ["results"]),
    "output-is-input": (_out_is_input, ["-o", "input"]),
    "output-is-input-other-spelling": (_out_is_input_relative, ["-o", "input"]),
    "output-symlink-to-input": (_out_symlink_to_input, ["-o", "input"]),
    "output-hardlink-to-input": (_out_hardlink_to_input, ["-o", "input"]),
}


@pytest.mark.parametrize("build, words", OUTPUT_CASES.values(), ids=OUTPUT_CASES.keys())
def test_bad_output_path(capfd, tmp_path: Path, build: Callable[[Path], tuple[Argv, Path]], words: Words) -> None:
    argv, out = build(tmp_path)
    assert_cli_error(capfd, tmp_path, argv, code=2, words=words, output=out)


def test_existing_output_survives_a_failed_run(capfd, tmp_path: Path) -> None:
    """A previous result at -o is left byte-identical when the new run fails (here: NaN in the data)."""
    data = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    data[-1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", data)
    (tmp_path / "q.onnx").write_bytes(b"previous result")
    assert_cli_error(capfd, tmp_path, _q(tmp_path, data=tmp_path / "nan.npy"), code=1, words=["nan"],
                     output=tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx").read_bytes() == b"previous result"


def test_backend_limit_fails_before_calibration(capfd, tmp_path: Path) -> None:
    """fp8 for Core ML names the tensors and the backend before any calibration work.

    The data has a NaN in its last sample: had calibration run first, the error would be about the NaN.
    """
    data = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    data[-1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", data)
    line = assert_cli_error(capfd, tmp_path, _q(tmp_path, "--preset", "fp8", "--backend", "coreml",
                                                  data=tmp_path / "nan.npy"),
                            code=1, words=["coreml", "float8_e4m3fn", "conv.weight"], output=tmp_path / "q.onnx")
    assert "nan" not in line.lower()


@pytest.mark.parametrize("backend", ["coreml", "coreai"])
def test_float16_model_for_core_ml_fails_before_calibration(capfd, tmp_path: Path, backend: str) -> None:
    """Core ML / Core AI lower float32 models: a float16 one gets one line naming the backend and the float16
    tensors, before calibration (the NaN in the data is never read), not a torch dtype error after it."""
    from onnx import TensorProto, numpy_helper

    model = conv_model()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    save_model(model, tmp_path / "half.onnx")
    data = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float16)
    data[-1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", data)
    out = tmp_path / ("q.mlpackage" if backend == "coreml" else "q.aimodel")
    line = assert_cli_error(capfd, tmp_path, ["quantize", str(tmp_path / "half.onnx"), "-o", str(out), "--calib-data",
                                              str(tmp_path / "nan.npy"), "--backend", backend],
                            code=1, words=[backend, "float16", "float32", "pixels"], output=out)
    assert "nan" not in line.lower()


# ----------------------------------------------------------------------------- signals (subprocess)

#: Runs the real CLI and creates MARKER when the 20th calibration file is opened, so the signal arrives
#: while qdq is working through the data (not while Python is still importing), with ~1500 files to go.
_LAUNCHER = """
import os, sys
marker, folder = sys.argv[1], sys.argv[2]
opened = []
def hook(event, args):
    if event == "open" and len(opened) < 20 and args and isinstance(args[0], (str, os.PathLike)):
        if os.fspath(args[0]).startswith(folder):
            opened.append(1)
            if len(opened) == 20:
                with open(marker, "w"):
                    pass
sys.addaudithook(hook)
from qdq.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def slow_calibration(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model and a folder of 1500 one-sample .npy files: calibration at --batch-size 1 takes seconds."""
    root = tmp_path_factory.mktemp("slow")
    model = _conv(root)
    folder = root / "calib"
    folder.mkdir()
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32))
    for i in range(1500):  # the same small array: writing bytes is 20x faster than np.save per file
        (folder / f"{i:05d}.npy").write_bytes(buffer.getvalue())
    return model, folder


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.usefixtures("sigint_for_children")
def test_signal_during_calibration(tmp_path: Path, slow_calibration: tuple[Path, Path], sig: int, code: int) -> None:
    model, folder = slow_calibration
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "calibrating"
    out = work / "q.onnx"
    inputs_before = snapshot(folder.parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(marker), str(folder), "--quiet", "quantize", str(model), "-o", str(out),
         "--calib-data", str(folder), "--batch-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert marker.exists(), f"qdq never read the calibration data: {proc.communicate(timeout=30)}"
        assert proc.poll() is None, "calibration finished before the signal: make the data source slower"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr: {err}"
    assert_one_error_line(err, [("interrupt", "signal", "sigterm", "terminated", "cancel")])
    assert snapshot(work) == {}, "partial output or temp files left behind"
    assert snapshot(folder.parent) == inputs_before
