"""Read a saved ``.aimodel`` without running it: op counts, stored dtypes, and how every weight is stored."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Any

from qdq.backends.coreai._extra import require
from qdq.errors import BackendError, first_line

__all__ = ["inspect"]

_TENSOR = re.compile(r"tensor<([^>]*)>")
_CONSTEXPR = re.compile(r"=\s*coreai\.blockwise_shift_scale\s+([^:]*?)\s*:\s*\((.*)\)\s*->\s*(tensor<[^>]*>)")
_CONSTANT = re.compile(r"^\s*(%[\w.]+)\s*=\s*coreai\.constant\b.*:\s*(tensor<[^>]*>)\s*$")
_FLOAT = ("f32", "f16", "bf16", "f64")


def _tensor_type(text: str) -> tuple[tuple[int | None, ...], str]:
    """``tensor<16x3x3xsi8>`` -> ((16, 3, 3), 'si8'); ``?`` dims are None."""
    match = _TENSOR.search(text)
    if match is None:
        return (), ""
    *dims, dtype = match.group(1).split("x") if "x" in match.group(1) else ("", match.group(1))
    return tuple(None if d == "?" else int(d) for d in dims if d != ""), dtype


def _dtype_name(mlir: str) -> str:
    """MLIR element type -> qdq's dtype name (``si8`` -> int8, ``ui4`` -> uint4, ``f8E4M3FN`` -> float8_e4m3fn)."""
    if mlir.startswith(("si", "ui", "i")) and mlir.lstrip("sui").isdigit():
        bits = mlir.lstrip("sui")
        return ("uint" if mlir.startswith("ui") else "int") + bits
    if mlir.startswith("f8"):
        return "float8_" + mlir[2:].lower()
    return {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(mlir, mlir)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of an ``.aimodel``: ``ops`` (op -> count), ``storage`` (stored dtype -> element count),
    ``weights`` (one entry per ``blockwise_shift_scale``: shape and stored dtype), ``weight_dtypes``
    (dtype -> count), ``activation_pairs`` (``quantize`` ops), ``float_weights`` (float constants shaped
    like a quantized weight: a float copy), ``inputs`` / ``outputs`` (names of the main function) and ``size_bytes``."""
    path = Path(path)
    authoring = require("coreai.authoring")
    try:
        asset = authoring.AIModelAsset.load(path)
        summary = asset.summary()
    except Exception as exc:
        raise BackendError(f"cannot read the Core AI asset {path}: {first_line(exc, with_type=True)}") from exc
    ops = dict(summary.operation_distribution)
    storage = dict(summary.storage_types)
    weights: list[dict[str, Any]] = []
    float_consts: dict[str, tuple[int | None, ...]] = {}
    constexpr_operands: set[str] = set()
    for line in str(asset.program._module).splitlines():  # the program's MLIR text
        m = _CONSTEXPR.search(line)
        if m is not None:
            constexpr_operands.update(a.strip() for a in m.group(1).split(","))
            shape, dtype = _tensor_type(m.group(2).split(",")[0])
            weights.append({"shape": shape, "dtype": _dtype_name(dtype)})
            continue
        c = _CONSTANT.search(line)
        if c is not None:
            shape, dtype = _tensor_type(c.group(2))
            if dtype in _FLOAT and len(shape) >= 2:
                float_consts[c.group(1)] = shape
    weight_shapes = {w["shape"] for w in weights}
    main = summary.function_names[0] if summary.function_names else "main"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {
        "ops": ops,
        "storage": storage,
        "weights": weights,
        "weight_dtypes": dict(collections.Counter(w["dtype"] for w in weights)),
        "activation_pairs": int(ops.get("quantize", 0)),
        "float_weights": [s for k, s in float_consts.items() if s in weight_shapes and k not in constexpr_operands],
        "inputs": [name for name, _ in summary.function_inputs(main)],
        "outputs": [name for name, _ in summary.function_outputs(main)],
        "size_bytes": size,
    }
