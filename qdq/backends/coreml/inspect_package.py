"""Read a converted ``.mlpackage`` on any OS: op counts, how each weight is stored, float copies left.

Walks ``MLModel(path, skip_model_load=True).get_spec()``: every mlProgram function, block
specialization and nested block. A weight is the ``weight`` input of ``conv`` / ``linear`` or an
operand of ``matmul``; its source is a ``constexpr_*`` op (quantized: data dtype INT8/UINT8/INT4/UINT4)
or a ``const`` (float: a float copy of the weight).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from qdq.backends.coreml.convert import coremltools

__all__ = ["inspect"]

_WEIGHT_INPUTS = {"conv": ("weight",), "conv_transpose": ("weight",), "linear": ("weight",), "matmul": ("x", "y")}
_DATA_KEYS = ("data", "quantized_data")
_FLOAT = ("FLOAT16", "FLOAT32", "FLOAT64", "BFLOAT16")
_DATA_MOVEMENT = ("reshape", "transpose", "pad")  # between a dequantize and the op reading it


def _ops(block: Any) -> Any:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _ops(inner)


def _tensor_type(value_type: Any, dt_name: Any) -> tuple[str, tuple[int, ...]]:
    tt = value_type.tensorType
    dims = tuple(int(d.constant.size) for d in tt.dimensions)
    return dt_name(tt.dataType), dims


def _arg_name(op: Any, key: str) -> str | None:
    arg = op.inputs.get(key)
    if arg is None or not arg.arguments:
        return None
    return arg.arguments[0].name or None


def _inline_value(op: Any, key: str) -> Any:
    arg = op.inputs.get(key)
    if arg is None or not arg.arguments or arg.arguments[0].name:
        return None
    value = arg.arguments[0].value
    return value if value.HasField("type") else None


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a ``.mlpackage``: ``ops`` (type -> count), ``weights`` (one entry per conv/linear/matmul
    constant operand: source op, dtype, shape), ``weight_dtypes`` (dtype -> count of constexpr weights),
    ``float_weights`` (weights read from a float ``const``: a float copy), ``dequantized_inputs`` /
    ``float_inputs`` (conv / linear activation inputs read from a ``dequantize``, through reshape / transpose / pad, or not),
    ``size_bytes``.
    """
    ct = coremltools()
    from coremltools.proto import MIL_pb2

    dt_name = MIL_pb2.DataType.Name
    path = Path(path)
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    ops: collections.Counter[str] = collections.Counter()
    producers: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # var -> (op type, dtype, shape)
    consumers: list[tuple[Any, str]] = []
    op_of: dict[str, Any] = {}  # var -> the op producing it
    for func in spec.mlProgram.functions.values():
        for block in func.block_specializations.values():
            for op in _ops(block):
                ops[op.type] += 1
                info = None
                if op.type.startswith("constexpr_"):
                    for key in _DATA_KEYS:
                        if key in op.attributes:  # iOS17: quantized data is an attribute
                            info = _tensor_type(op.attributes[key].type, dt_name)
                        elif (src := _arg_name(op, key)) is not None and src in producers:
                            info = producers[src][1:]
                        elif (inline := _inline_value(op, key)) is not None:  # iOS18: an inline operand
                            info = _tensor_type(inline.type, dt_name)
                elif op.type == "const" and "val" in op.attributes:
                    info = _tensor_type(op.attributes["val"].type, dt_name)
                for out in op.outputs:
                    op_of[out.name] = op
                    if info is not None:
                        producers[out.name] = (op.type, info[0], info[1])
                if op.type in _WEIGHT_INPUTS:
                    consumers.append((op, op.type))
    weights: list[dict[str, Any]] = []
    for op, kind in consumers:
        for key in _WEIGHT_INPUTS[kind]:
            src = _arg_name(op, key)
            if src is None or src not in producers:
                continue  # a runtime tensor (activation)
            src_type, dtype, shape = producers[src]
            weights.append({"consumer": kind, "var": src, "source": src_type, "dtype": dtype, "shape": shape})
    # activation inputs of conv / linear: read from a dequantize (through reshape/transpose/pad) or float
    dequantized = float_inputs = 0
    for op, kind in consumers:
        if kind == "matmul":
            continue
        src = _arg_name(op, "x")
        while src is not None and src in op_of and op_of[src].type in _DATA_MOVEMENT:
            src = _arg_name(op_of[src], "x")
        if src is not None and src in op_of and op_of[src].type == "dequantize":
            dequantized += 1
        else:
            float_inputs += 1
    weight_dtypes = collections.Counter(w["dtype"] for w in weights if w["source"].startswith("constexpr_"))
    float_weights = [w for w in weights if w["source"] == "const" and w["dtype"] in _FLOAT and len(w["shape"]) >= 2]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {
        "ops": dict(ops),
        "weights": weights,
        "weight_dtypes": dict(weight_dtypes),
        "float_weights": float_weights,
        "dequantized_inputs": dequantized,
        "float_inputs": float_inputs,
        "size_bytes": size,
    }
