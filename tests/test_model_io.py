"""Saving: atomic, external data for large models, the input never touched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qdq
from qdq import ModelError
from qdq import model_io


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
