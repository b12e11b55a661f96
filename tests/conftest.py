"""Shared fixtures: small exported models (session-scoped, exported once per test run)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from models.digits import load_digits_data

    return load_digits_data()


@pytest.fixture(scope="session")
def digits_onnx(model_dir: Path, digits_data) -> Path:
    from models.digits import trained_digits_cnn
    from qdq.torch_export import export

    model, _ = trained_digits_cnn()
    return export(model, (torch.from_numpy(digits_data[0][:2]),), model_dir / "digits.onnx")


@pytest.fixture(scope="session")
def mlp_onnx(model_dir: Path) -> Path:
    from models.tiny import factory_mlp
    from qdq.torch_export import export

    model, example = factory_mlp()
    return export(model, example, model_dir / "mlp.onnx")


@pytest.fixture(scope="session")
def attention_onnx(model_dir: Path) -> Path:
    from models.tiny import factory_attention
    from qdq.torch_export import export

    model, example = factory_attention()
    return export(model, example, model_dir / "attention.onnx")


@pytest.fixture
def sigint_for_children() -> Iterator[None]:
    """Children started meanwhile get SIGINT's default disposition, as from a terminal: a runner started in the
    background (`pytest &`) ignores SIGINT, and an ignored signal stays ignored across exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, previous)
