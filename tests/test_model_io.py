"""Saving: atomic, external data for large models, the input never touched."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

import qdq
from qdq import ModelError, model_io


def test_large_models_save_with_external_data(tmp_path, digits_onnx, monkeypatch) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)  # pretend the model is over 2 GB
    out = model_io.save(qdq.load_model(digits_onnx), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 1000
    model = onnx.load(out, load_external_data=False)
    onnx.checker.check_model(str(out), full_check=True)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    from qdq.calibration.runner import make_session

    x = np.zeros((2, 1, 8, 8), np.float32)
    ref = make_session(qdq.load_model(digits_onnx)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(make_session(qdq.load_model(out)).run(None, {"x": x})[0], ref)


def test_failed_save_leaves_no_partial_file(tmp_path, digits_onnx, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_io.ir, "save", boom)
    with pytest.raises(ModelError, match="disk full"):
        model_io.save(qdq.load_model(digits_onnx), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_a_clear_error(tmp_path, digits_onnx) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        model_io.save(qdq.load_model(digits_onnx), tmp_path / "nope" / "out.onnx")


# ----------------------------------------------------------------------------- loading: named errors


def _tiny(opset: int = 17) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_empty_and_truncated_files_are_named(tmp_path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.onnx is empty \(0 bytes\): not an ONNX model"):
        qdq.load_model(empty)
    data = _tiny().SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"cut\.onnx is not a readable ONNX model: truncated"):
        qdq.load_model(cut)


def test_dangling_input_is_named(tmp_path) -> None:
    m = _tiny()
    m.graph.node[0].input[1] = "ghost"
    with pytest.raises(ModelError, match=r"node 'mm' \(MatMul\) reads tensor 'ghost', which no node"):
        qdq.load_model(m)
    path = tmp_path / "d.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="ghost"):
        qdq.Quantizer(path)


def _external_model(folder) -> Path:  # noqa: F821 - pathlib type in a string
    folder.mkdir()
    onnx.save_model(_tiny(), folder / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    return folder / "m.onnx"


def test_external_data_missing_short_or_outside_is_named(tmp_path) -> None:
    path = _external_model(tmp_path / "a")
    (path.parent / "w.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ModelError, match="external data file 'w.bin' for initializer 'w' .* is short: 10 bytes"):
        qdq.load_model(path)
    (path.parent / "w.bin").unlink()
    with pytest.raises(ModelError, match="external data file 'w.bin' for initializer 'w' .* is missing"):
        qdq.load_model(path)
    m = onnx.load(path, load_external_data=False)
    m.graph.initializer[0].external_data[0].value = "../w.bin"
    (tmp_path / "w.bin").write_bytes(b"\0" * 48)
    path.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match=r"'\.\./w\.bin' for initializer 'w' .* is outside the model folder"):
        qdq.load_model(path)


# ----------------------------------------------------------------------------- saving: atomic, nothing stale


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_external_save_replaces_data_then_model_and_leaves_nothing_stale(tmp_path, digits_onnx,
                                                                         monkeypatch) -> None:
    model = qdq.load_model(digits_onnx)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "m.onnx"
    model_io.save(model, out)
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    order = []
    real_replace = model_io.os.replace

    def tracking_replace(src, dst):
        order.append(model_io.Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "replace", tracking_replace)
    model_io.save(model, out)
    backup, data, last = order[-3:]
    assert backup.startswith(".m.onnx.data.") and backup.endswith(".bak")  # the old data kept until the end
    assert (data, last) == ("m.onnx.data", "m.onnx")  # the data file first, the model last
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]  # the backup of the old data is gone
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1_800_000_000)
    model_io.save(model, out)  # now small: one self-contained file, the old .data removed
    assert _listing(tmp_path) == ["m.onnx"]
    onnx.checker.check_model(str(out), full_check=True)


def test_failure_between_renames_restores_the_previous_files(tmp_path, digits_onnx, monkeypatch) -> None:
    model = qdq.load_model(digits_onnx)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "m.onnx"
    model_io.save(model, out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = model_io.os.replace

    def fail_on_model(src, dst):
        if model_io.Path(dst) == out:
            raise KeyboardInterrupt  # Ctrl-C after the data file was renamed, before the model
        return real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "replace", fail_on_model)
    with pytest.raises(KeyboardInterrupt):
        model_io.save(model_io.load_model(digits_onnx), out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, old files intact


def test_model_with_external_data_saves_self_contained_elsewhere(tmp_path) -> None:
    src = _external_model(tmp_path / "src")
    model = qdq.load_model(src)
    weight = model.graph.initializers["w"].const_value
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    model_io.save(model, out)
    assert _listing(out.parent) == ["copy.onnx"]
    assert model.graph.initializers["w"].const_value is weight  # input object kept
    loaded = onnx.load(out)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                  np.arange(12, dtype=np.float32).reshape(3, 4))


def test_small_external_constants_are_read_in(tmp_path) -> None:
    """A model saved with every tensor outside (size_threshold=0) puts ReduceMean's axes there too; onnxruntime
    cannot load it from its path. qdq reads the small ones in: quantize, compare and report run, and large
    weights stay external in the loaded model."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(0, 0.3, (64, 32)).astype(np.float32), "w")
    axes = onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                               helper.make_node("ReduceMean", ["h", "axes"], ["y"], keepdims=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], [w, axes])
    folder = tmp_path / "m"
    folder.mkdir()
    src = folder / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), src,
                    save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = qdq.load_model(src)
    assert isinstance(loaded.graph.initializers["w"].const_value, model_io.ir.ExternalTensor)
    assert not isinstance(loaded.graph.initializers["axes"].const_value, model_io.ir.ExternalTensor)
    np.save(tmp_path / "x.npy", rng.standard_normal((32, 64)).astype(np.float32))
    out = tmp_path / "q.onnx"
    qdq.quantize(src, "int8", tmp_path / "x.npy", output=out, progress=False)
    report = qdq.compare(src, out, tmp_path / "x.npy", progress=False)
    assert report.outputs[0].sqnr_db > 25


@pytest.mark.parametrize("preset", ["int8", "w4"])
def test_weights_with_default_input_slots_are_frozen(tmp_path, preset, caplog) -> None:
    """An IR<4-style model lists its Gemm weight and bias as graph inputs with defaults. Every preset quantizes them as
    constants and drops them from the inputs, saying so (int8 kept them as inputs a fed value silently bypassed, fp8/w4
    dropped them and compare then refused the pair); compare runs."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "W")
    b = onnx.numpy_helper.from_array(rng.normal(0, 0.3, (8,)).astype(np.float32), "B")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 8]),
                               helper.make_tensor_value_info("B", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w, b])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    np.save(tmp_path / "x.npy", rng.standard_normal((16, 8)).astype(np.float32))
    caplog.set_level(logging.WARNING)  # the CLI tests leave the root logger at ERROR (--quiet)
    out = tmp_path / "q.onnx"
    qdq.quantize(src, preset, tmp_path / "x.npy", output=out, progress=False)
    assert [i.name for i in onnx.load(out).graph.input] == ["x"]
    assert "W, B have default values" in caplog.text
    assert qdq.compare(src, out, tmp_path / "x.npy", progress=False).outputs[0].sqnr_db > 20
