"""Shared fixtures: small exported models (session-scoped, exported once per test run)."""

from __future__ import annotations

import contextlib
import itertools
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


@pytest.fixture()
def token_lm(tmp_path: Path):
    """A factory of tiny ONNX "LMs": x [N, S, 16] -> (MatMul -> Relu ->) MatMul -> logits [N, S, vocab]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def make(vocab: int = 12, hidden: int | None = None) -> Path:
        rng = np.random.default_rng(0)
        dims = [16, *([hidden] if hidden else []), vocab]
        weights = [numpy_helper.from_array(rng.normal(0, 0.5, (a, b)).astype(np.float32), f"W{i}")
                   for i, (a, b) in enumerate(itertools.pairwise(dims))]
        nodes, x = [], "x"
        for i, w in enumerate(weights):
            out = "logits" if i == len(weights) - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, w.name], [out]))
            if out != "logits":
                nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
                out = f"r{i}"
            x = out
        graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 16])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", vocab])],
                                  weights)
        path = tmp_path / f"lm_{vocab}_{hidden}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
        return path

    return make
