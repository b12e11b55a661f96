"""The QAT mirror's op table: ONNX op type -> a torch implementation with ONNX semantics.

One entry per op type, registered with :func:`register_op` (duplicates are rejected). An entry is
a *compiler*: it reads the node's attributes (and constant inputs) once and returns a function
``run(inputs, state) -> outputs`` that the interpreter (:mod:`qdq.qat.onnx_module`) calls on every
forward. ``state`` is the interpreter module (``training``, ``bn_frozen``, ``calibrating``).

Everything here is differentiable where torch is; ONNX-specific details (asymmetric ``pads``,
``auto_pad``, ``allowzero``, negative Gather indices, Slice clamping, opset<13 Softmax) are
handled explicitly so the mirror computes what onnxruntime computes, to float rounding.
QuantizeLinear/DequantizeLinear are not here: the interpreter turns each Q->DQ pair into a
:class:`~qdq.qat.fake_quant.FakeQuantize`.

This module is the table and the helpers the implementations share; the built-in implementations
live by family in :mod:`qdq.qat.ops_compute`, :mod:`qdq.qat.ops_elementwise` and
:mod:`qdq.qat.ops_shape`, which register themselves here (the interpreter imports them).

Register your own op::

    @register_op("MyOp", domain="com.example")
    def _my_op(node, ctx):
        alpha = node.attributes.get_float("alpha", 1.0)
        return lambda ins, state: (ins[0] * alpha,)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from qdq.errors import ModelError

__all__ = [
    "TORCH_DTYPES",
    "CompileContext",
    "OpCompiler",
    "OpFn",
    "get_op",
    "register_op",
    "static_value",
    "supported_ops",
]

logger = logging.getLogger(__name__)

Tensors = Sequence[Any]  # torch.Tensor, or None for an omitted optional input
OpFn = Callable[[Tensors, Any], Sequence[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class CompileContext:
    """What a compiler may need beyond the node: the model's default-domain opset."""

    opset: int

    @classmethod
    def of(cls, model: ir.Model) -> CompileContext:
        return cls(opset=int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 21))))


OpCompiler = Callable[[ir.Node, CompileContext], OpFn]

_OPS: dict[tuple[str, str], OpCompiler] = {}

#: ONNX element type -> torch dtype (for Cast, ConstantOfShape and initializers).
TORCH_DTYPES: dict[ir.DataType, torch.dtype] = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64, ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.INT16: torch.int16, ir.DataType.INT32: torch.int32, ir.DataType.INT64: torch.int64,
    ir.DataType.BOOL: torch.bool, ir.DataType.UINT16: torch.uint16, ir.DataType.UINT32: torch.uint32,
    ir.DataType.UINT64: torch.uint64, ir.DataType.FLOAT8E4M3FN: torch.float8_e4m3fn,
    ir.DataType.FLOAT8E5M2: torch.float8_e5m2,
}


def register_op(*op_types: str, domain: str = "") -> Callable[[OpCompiler], OpCompiler]:
    """Decorator: the compiler for ``op_types`` in ``domain`` (a second registration is an error)."""

    def deco(fn: OpCompiler) -> OpCompiler:
        for op in op_types:
            key = (domain, op)
            if key in _OPS and _OPS[key] is not fn:
                raise ValueError(f"a torch implementation of {domain or 'ai.onnx'}::{op} is already registered")
            _OPS[key] = fn
        return fn

    return deco


def get_op(op_type: str, domain: str = "") -> OpCompiler | None:
    return _OPS.get((_norm_domain(domain), op_type))


def supported_ops() -> list[str]:
    """Op types (default domain) the mirror runs in torch."""
    return sorted(op for d, op in _OPS if d == "")


def _norm_domain(domain: str | None) -> str:
    return "" if domain in (None, "", "ai.onnx") else domain


# --------------------------------------------------------------------------- helpers
def static_value(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant input (initializer or Constant node output), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and _norm_domain(producer.domain) == "":
        return constant_attr_value(producer)
    return None


def constant_attr_value(node: ir.Node) -> np.ndarray:
    """The value of a Constant node's attribute."""
    attrs = node.attributes
    if "value" in attrs:
        return attrs["value"].as_tensor().numpy()
    if "value_float" in attrs:
        return np.asarray(attrs["value_float"].as_float(), np.float32)
    if "value_floats" in attrs:
        return np.asarray(list(attrs["value_floats"].as_floats()), np.float32)
    if "value_int" in attrs:
        return np.asarray(attrs["value_int"].as_int(), np.int64)
    if "value_ints" in attrs:
        return np.asarray(list(attrs["value_ints"].as_ints()), np.int64)
    raise ModelError(f"Constant node '{node.name}': unsupported attribute(s) {sorted(attrs)} in the QAT mirror")


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def _input(ins: Tensors, i: int) -> torch.Tensor | None:
    return ins[i] if i < len(ins) else None


def _int_list(t: torch.Tensor | None) -> list[int] | None:
    # a constant may carry its values (qdq.backends.torch_program: readable while torch.export traces)
    static = getattr(t, "qdq_static_value", None)
    if static is not None:
        return list(static)
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(node: ir.Node, ins: Tensors, index: int) -> list[int] | None:
    """Axes from the attribute (old opsets) or the input at ``index`` (new opsets)."""
    attr = _ints(node, "axes")
    return attr if attr is not None else _int_list(_input(ins, index))


def _unused_extra_outputs(node: ir.Node, keep: int) -> None:
    for out in node.outputs[keep:]:
        if out.uses() or out.is_graph_output():
            raise ModelError(
                f"node '{node.name}' ({node.op_type}): output {out.name!r} is only produced in training "
                "graphs; the QAT mirror supports the inference form of this op"
            )


def _resolve_pads(auto_pad: str, pads: list[int] | None, spatial: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX pads ``[b1, b2, ..., e1, e2, ...]`` after applying ``auto_pad``."""
    nd = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-int(size) // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - int(size), 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    if auto_pad == "VALID" or pads is None:
        return [0] * (2 * nd)
    return list(pads)


def _torch_pad(pads: Sequence[int], nd: int) -> list[int]:
    """ONNX ``[b1..bn, e1..en]`` over the last ``nd`` dims -> F.pad's ``(bn, en, ..., b1, e1)``."""
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [int(pads[i]), int(pads[i + nd])]
    return out


def _pool_padding(x: torch.Tensor, pads: list[int], kernel: Sequence[int], value: float) -> tuple[torch.Tensor, list[int]]:
    """Symmetric pads within torch's limit go to the op; anything else is padded explicitly."""
    nd = len(kernel)
    begins, ends = pads[:nd], pads[nd:]
    if begins == ends and all(p <= k // 2 for p, k in zip(begins, kernel)):
        return x, begins
    return F.pad(x, _torch_pad(pads, nd), value=value), [0] * nd


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
