"""Shared pieces of the bad-input corpus (tests/test_corpus_*.py): tiny models and the CLI error check.

Every corpus case runs the real command line (``qdq.cli.main``) inside its own folder and checks the
contract for user mistakes: the exit code, exactly one stderr line ``qdq: error: ...`` naming the problem,
no traceback and no "internal error", and a folder that is byte-for-byte what it was before (nothing
written, no temp files left, inputs unchanged).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qdq.cli import main

__all__ = [
    "Words",
    "assert_cli_error",
    "assert_one_error_line",
    "conv_model",
    "mlp_model",
    "run_cli",
    "save_model",
    "snapshot",
    "token_model",
    "two_input_model",
]

#: Key words an error line must contain (case-insensitive); a tuple entry means "any of these".
Words = Sequence["str | tuple[str, ...]"]

_RNG_SEED = 0


def _rng() -> np.random.Generator:
    return np.random.default_rng(_RNG_SEED)


def conv_model(*, opset: int = 17, batch: int | str = "N", input_name: str = "pixels") -> onnx.ModelProto:
    """Conv(3->4, 3x3) + Relu on [batch, 3, 8, 8]: the image-shaped model of the corpus."""
    rng = _rng()
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.bias")
    graph = helper.make_graph(
        [helper.make_node("Conv", [input_name, "conv.weight", "conv.bias"], ["conv_out"], pads=[1, 1, 1, 1],
                          name="conv1"),
         helper.make_node("Relu", ["conv_out"], ["features"], name="relu1")],
        "conv", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 4, 8, 8])], initializer=[w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset >= 13 else 7)


def mlp_model(*, in_features: int = 16, classes: int = 10, input_name: str = "features") -> onnx.ModelProto:
    """Gemm-Relu-Gemm on [N, in_features] -> [N, classes] logits (a classifier for compare/labels cases)."""
    rng = _rng()
    w1 = numpy_helper.from_array(rng.standard_normal((32, in_features)).astype(np.float32), "fc1.weight")
    b1 = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "fc1.bias")
    w2 = numpy_helper.from_array(rng.standard_normal((classes, 32)).astype(np.float32), "fc2.weight")
    b2 = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fc2.bias")
    graph = helper.make_graph(
        [helper.make_node("Gemm", [input_name, "fc1.weight", "fc1.bias"], ["h"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
         helper.make_node("Gemm", ["h_relu", "fc2.weight", "fc2.bias"], ["logits"], transB=1, name="fc2")],
        "mlp", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], initializer=[w1, b1, w2, b2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def two_input_model() -> onnx.ModelProto:
    """Add(left, right) -> MatMul: two float inputs [N, 4], fed from an .npz by name."""
    w = numpy_helper.from_array(_rng().standard_normal((4, 3)).astype(np.float32), "proj.weight")
    graph = helper.make_graph(
        [helper.make_node("Add", ["left", "right"], ["sum"], name="add"),
         helper.make_node("MatMul", ["sum", "proj.weight"], ["out"], name="proj")],
        "two", [helper.make_tensor_value_info("left", TensorProto.FLOAT, ["N", 4]),
                helper.make_tensor_value_info("right", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def token_model() -> onnx.ModelProto:
    """Gather(embedding, input_ids int64 [N, 5]) -> MatMul: the token-id model (ids are fed, never quantized)."""
    rng = _rng()
    emb = numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "embedding")
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "head.weight")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"], name="embed"),
         helper.make_node("MatMul", ["tokens", "head.weight"], ["scores"], name="head")],
        "tokens", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5, 3])], initializer=[emb, w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Serialize without any check (corpus models are broken on purpose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too) -> content hash, link target or 'dir'."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(capfd, argv: Sequence[str]) -> tuple[int, str, str]:
    """Run ``qdq`` in-process (argparse's SystemExit becomes the exit code); returns (code, stdout, stderr).

    ``capfd`` (not capsys) so that what onnx/onnxruntime print from C++ counts too: users see it.
    """
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_error_line(err: str, words: Words) -> None:
    """stderr is exactly one ``qdq: error:`` line, no traceback/internal error, naming every key word."""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected exactly one stderr line, got:\n{err}"
    line = lines[0]
    assert line.startswith("qdq: error: "), line
    assert "internal error" not in line and "Traceback" not in err, line
    low = line.lower()
    for word in words:
        options = (word,) if isinstance(word, str) else word
        assert any(o.lower() in low for o in options), f"error line does not name {options!r}: {line}"


def assert_cli_error(capfd, root: Path, argv: Sequence[str], *, code: int, words: Words,
                     output: Path | None = None, extra_roots: Sequence[Path] = ()) -> str:
    """Run ``qdq --quiet <argv>`` and check the whole user-mistake contract; returns the error line.

    ``root`` (and ``extra_roots``) must be unchanged afterwards: inputs byte-identical, no output,
    no temp files. ``output`` (the -o path) must not exist unless it existed before.
    """
    roots = [root, *extra_roots]
    before = [snapshot(r) for r in roots]
    existed = output is not None and (output.exists() or output.is_symlink())
    got, out, err = run_cli(capfd, ["--quiet", *argv])
    assert got == code, f"exit code {got}, expected {code}; stderr: {err}"
    assert_one_error_line(err, words)
    assert out == "", f"--quiet printed to stdout: {out}"
    if output is not None and not existed:
        assert not output.exists(), f"{output} was written despite the error"
    for r, snap in zip(roots, before):
        assert snapshot(r) == snap, f"files under {r} changed (output, temp files or modified inputs)"
    return err.strip()
