"""Corpus: broken, unusual and unsupported model files through ``qdq quantize``.

Every case is a user mistake (or an unsupported model) and must give exit code 1 and one line naming
the file, the tensor or the op at fault, with nothing written and the input untouched.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from corpus_helpers import Words, assert_cli_error, conv_model, run_cli, save_model, snapshot
from onnx import TensorProto, helper, numpy_helper


def _calib(d: Path) -> Path:
    path = d / "calib.npy"
    np.save(path, np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    return path


# ----------------------------------------------------------------------------- model builders (one per case)


def _missing(d: Path) -> Path:
    return d / "missing.onnx"


def _empty(d: Path) -> Path:
    path = d / "empty.onnx"
    path.write_bytes(b"")
    return path


def _truncated(d: Path) -> Path:
    data = conv_model().SerializeToString()
    path = d / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(d: Path) -> Path:
    path = d / "garbage.onnx"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _text(d: Path) -> Path:
    path = d / "notes.onnx"
    path.write_text("this is a text file, not a model\n")
    return path


def _directory(d: Path) -> Path:
    path = d / "model.onnx"
    path.mkdir()
    (path / "model.onnx").write_bytes(conv_model().SerializeToString())
    return path


def _zip_archive(d: Path) -> Path:  # e.g. a torch checkpoint renamed to .onnx
    path = d / "checkpoint.onnx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x04N.")
    return path


def _checker_fails(d: Path) -> Path:  # parses as protobuf, but Relu gets two inputs
    m = conv_model()
    m.graph.node[1].input.append("conv.bias")
    m.graph.node[1].name = "bad_relu"
    return save_model(m, d / "checker.onnx")


def _unknown_standard_op(d: Path) -> Path:
    m = conv_model()
    m.graph.node[1].op_type = "Rectifier"
    return save_model(m, d / "unknown_op.onnx")


def _dangling_input(d: Path) -> Path:
    m = conv_model()
    m.graph.node[1].input[0] = "ghost_tensor"
    return save_model(m, d / "dangling.onnx")


def _dangling_output(d: Path) -> Path:
    m = conv_model()
    m.graph.output[0].name = "phantom_output"
    return save_model(m, d / "no_producer.onnx")


def _duplicate_outputs(d: Path) -> Path:
    m = conv_model()
    m.graph.node[0].output[0] = "dup_out"
    m.graph.node[1].input[0] = "dup_out"
    m.graph.node.insert(1, helper.make_node("Identity", ["pixels"], ["dup_out"], name="second_writer"))
    return save_model(m, d / "duplicate.onnx")


def _corrupt_initializer(d: Path) -> Path:  # raw data shorter than the declared dims
    m = conv_model()
    w = m.graph.initializer[0]
    w.raw_data = w.raw_data[:20]
    return save_model(m, d / "short_weight.onnx")


def _no_inputs(d: Path) -> Path:
    c = numpy_helper.from_array(np.ones((2, 4), np.float32), "const")
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["const", "w"], ["y"], name="mm")], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=[c, w])
    return save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                      d / "no_inputs.onnx")


def _already_quantized(d: Path) -> Path:
    m = conv_model()
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "in_scale")
    zp = numpy_helper.from_array(np.array(0, np.int8), "in_zp")
    m.graph.initializer.extend([scale, zp])
    m.graph.node[0].input[0] = "pixels_dq"
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["pixels_q", "in_scale", "in_zp"], ["pixels_dq"],
                                            name="dq_in"))
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["pixels", "in_scale", "in_zp"], ["pixels_q"],
                                            name="q_in"))
    return save_model(m, d / "quantized.onnx")


def _ir_version_too_new(d: Path) -> Path:
    m = conv_model()
    m.ir_version = 99
    return save_model(m, d / "future.onnx")


def _external(d: Path, location: str = "weights.bin") -> Path:
    """Conv model with every initializer in ``location`` beside it (a valid model: the cases break it)."""
    m = conv_model()
    folder = d / "model_dir"
    folder.mkdir()
    onnx.save_model(m, folder / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return folder / "ext.onnx"


def _external_missing(d: Path) -> Path:
    path = _external(d)
    (path.parent / "weights.bin").unlink()
    return path


def _external_short(d: Path) -> Path:
    path = _external(d)
    data = path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    return path


def _relocate(path: Path, location: str) -> None:
    """Point every external initializer of ``path`` at ``location`` (the data itself is moved there)."""
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(m.SerializeToString())


def _external_escapes_folder(d: Path) -> Path:
    path = _external(d)
    os.replace(path.parent / "weights.bin", d / "escaped.bin")  # the data exists, but outside the model folder
    _relocate(path, "../escaped.bin")
    return path


def _external_absolute(d: Path) -> Path:
    path = _external(d)
    target = d / "absolute.bin"
    os.replace(path.parent / "weights.bin", target)
    _relocate(path, str(target))
    return path


def _unconvertible_opset(d: Path) -> Path:  # opset 7 with ImageScaler: removed in opset 10, no adapter
    m = conv_model(opset=7)
    m.graph.node[0].input[0] = "scaled"
    m.graph.node.insert(0, helper.make_node("ImageScaler", ["pixels"], ["scaled"], scale=2.0, bias=[0.0, 0.0, 0.0],
                                            name="scaler"))
    return save_model(m, d / "opset7.onnx")


def _custom_domain_op(d: Path) -> Path:  # onnxruntime has no kernel for it: calibration cannot run
    m = conv_model()
    m.graph.node[1].op_type = "FancyActivation"
    m.graph.node[1].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return save_model(m, d / "custom.onnx")


#: id -> (builder, key words the one-line error must contain)
MODEL_CASES: dict[str, tuple[Callable[[Path], Path], Words]] = {
    "nonexistent": (_missing, ["missing.onnx", ("not found", "does not exist", "no such")]),
    "zero-length": (_empty, ["empty.onnx", "empty"]),
    "truncated": (_truncated, ["truncated.onnx"]),
    "garbage-bytes": (_garbage, ["garbage.onnx"]),
    "text-file": (_text, ["notes.onnx"]),
    "directory": (_directory, ["model.onnx", ("directory", "folder", "not a file")]),
    "zip-archive": (_zip_archive, ["checkpoint.onnx"]),
    "checker-fails": (_checker_fails, ["checker.onnx", "bad_relu"]),
    "unknown-standard-op": (_unknown_standard_op, ["Rectifier"]),
    "dangling-input": (_dangling_input, ["ghost_tensor"]),
    "output-without-producer": (_dangling_output, ["phantom_output"]),
    "duplicate-outputs": (_duplicate_outputs, ["dup_out"]),
    "short-initializer": (_corrupt_initializer, ["conv.weight"]),
    "no-inputs": (_no_inputs, [("no inputs", "no graph inputs")]),
    "already-quantized": (_already_quantized, ["already quantized"]),
    "ir-version-too-new": (_ir_version_too_new, [("ir_version", "ir version")]),
    "external-missing": (_external_missing, ["weights.bin", ("missing", "not found", "does not exist")]),
    "external-short": (_external_short, ["weights.bin", ("truncated", "short", "bytes", "smaller")]),
    "external-escapes-folder": (_external_escapes_folder, ["escaped.bin", ("outside", "escape")]),
    "external-absolute-path": (_external_absolute, ["absolute.bin", ("outside", "escape", "absolute", "relative")]),
    "opset7-unconvertible-op": (_unconvertible_opset, ["ImageScaler"]),
    "custom-domain-op": (_custom_domain_op, ["FancyActivation"]),
}


@pytest.mark.parametrize("build, words", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_bad_model(capfd, tmp_path: Path, build: Callable[[Path], Path], words: Words) -> None:
    model = build(tmp_path)
    calib = _calib(tmp_path)
    out = tmp_path / "q.onnx"
    assert_cli_error(capfd, tmp_path, ["quantize", str(model), "-o", str(out), "--calib-data", str(calib)],
                     code=1, words=words, output=out)


def test_bad_model_inspect_is_one_line_too(capfd, tmp_path: Path) -> None:
    """`qdq inspect` reads models through the same checks."""
    model = _dangling_input(tmp_path)
    assert_cli_error(capfd, tmp_path, ["inspect", str(model)], code=1, words=["ghost_tensor"])


# ----------------------------------------------------------------------------- unusual but valid models


def _opset7(d: Path) -> Path:
    return save_model(conv_model(opset=7), d / "opset7.onnx")


def _opset11(d: Path) -> Path:
    return save_model(conv_model(opset=11), d / "opset11.onnx")


def _static_batch_1(d: Path) -> Path:
    return save_model(conv_model(batch=1), d / "batch1.onnx")


def _external_ok(d: Path) -> Path:
    return _external(d)


def _initializers_as_inputs(d: Path) -> Path:  # IR < 4 habit of old model zoo files: weights listed as inputs
    m = conv_model()
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return save_model(m, d / "zoo_style.onnx")


def _odd_path(d: Path) -> Path:
    return save_model(conv_model(), d / "mödel with spaces" / "ünïcode.onnx")


def _symlinked_model(d: Path) -> Path:
    target = save_model(conv_model(), d / "real" / "conv.onnx")
    link = d / "link.onnx"
    link.symlink_to(target)
    return link


VALID_CASES: dict[str, Callable[[Path], Path]] = {
    "opset7": _opset7,
    "opset11": _opset11,
    "static-batch-1": _static_batch_1,
    "external-data-beside-model": _external_ok,
    "initializers-listed-as-inputs": _initializers_as_inputs,
    "unicode-and-spaces-in-path": _odd_path,
    "model-is-a-symlink": _symlinked_model,
}


@pytest.mark.parametrize("build", VALID_CASES.values(), ids=VALID_CASES.keys())
def test_unusual_model_quantizes(capfd, tmp_path: Path, build: Callable[[Path], Path]) -> None:
    """Models a user meets in model zoos: quantized with default options, input untouched, output valid."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    model = build(inputs)
    calib = _calib(inputs)
    before = snapshot(inputs)
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capfd, ["--quiet", "quantize", str(model), "-o", str(out), "--calib-data", str(calib)])
    assert code == 0, err
    assert err == ""
    assert snapshot(inputs) == before
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node) or any(
        t.data_type == TensorProto.INT8 for t in q.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "q.onnx"], "temp files left beside the output"
