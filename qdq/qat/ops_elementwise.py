"""QAT mirror element-wise ops: arithmetic, activations, Clip, Softmax, Where and Cast, with ONNX
semantics (broadcasting, integer division, opset<13 Softmax; registered in :mod:`qdq.qat.torch_ops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from qdq.errors import ModelError
from qdq.qat.torch_ops import (
    TORCH_DTYPES,
    CompileContext,
    OpCompiler,
    OpFn,
    Tensors,
    _norm_axis,
    register_op,
    static_value,
)

__all__: list[str] = []  # registers ops with qdq.qat.torch_ops.register_op; nothing to import from here

# --------------------------------------------------------------------------- element-wise
def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div,
    "Pow": lambda a, b: torch.pow(a, b).to(a.dtype),
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}


def _binary_compiler(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpCompiler:
    return lambda node, ctx: (lambda ins, state: (fn(ins[0], ins[1]),))


for _name, _fn in _BINARY.items():
    register_op(_name)(_binary_compiler(_fn))


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mean: bool = False) -> OpCompiler:
    def compiler(node: ir.Node, ctx: CompileContext) -> OpFn:
        def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
            vals = [t for t in ins if t is not None]
            out = vals[0]
            for t in vals[1:]:
                out = fn(out, t)
            return (out / len(vals) if mean else out,)

        return run

    return compiler


register_op("Sum")(_variadic(torch.add))
register_op("Mean")(_variadic(torch.add, mean=True))
register_op("Max")(_variadic(torch.maximum))
register_op("Min")(_variadic(torch.minimum))


def _hard_swish(x: torch.Tensor) -> torch.Tensor:
    # ONNX: x * HardSigmoid(x; alpha=1/6, beta=0.5)
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal, "Erf": torch.erf,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Not": torch.logical_not, "Softsign": F.softsign, "Mish": F.mish,
    "Softplus": F.softplus,
    "HardSwish": _hard_swish, "Identity": lambda x: x,
}


def _unary_compiler(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpCompiler:
    return lambda node, ctx: (lambda ins, state: (fn(ins[0]),))


for _name, _ufn in _UNARY.items():
    register_op(_name)(_unary_compiler(_ufn))


@register_op("LeakyRelu")
def _leaky_relu(node: ir.Node, ctx: CompileContext) -> OpFn:
    alpha = node.attributes.get_float("alpha", 0.01)
    return lambda ins, state: (F.leaky_relu(ins[0], alpha),)


@register_op("Elu")
def _elu(node: ir.Node, ctx: CompileContext) -> OpFn:
    alpha = node.attributes.get_float("alpha", 1.0)
    return lambda ins, state: (F.elu(ins[0], alpha),)


@register_op("Celu")
def _celu(node: ir.Node, ctx: CompileContext) -> OpFn:
    alpha = node.attributes.get_float("alpha", 1.0)
    return lambda ins, state: (F.celu(ins[0], alpha),)


@register_op("Selu")
def _selu(node: ir.Node, ctx: CompileContext) -> OpFn:
    alpha = node.attributes.get_float("alpha", 1.67326319217681884765625)
    gamma = node.attributes.get_float("gamma", 1.05070102214813232421875)
    return lambda ins, state: (gamma * torch.where(ins[0] > 0, ins[0], alpha * torch.expm1(ins[0])),)


@register_op("HardSigmoid")
def _hard_sigmoid(node: ir.Node, ctx: CompileContext) -> OpFn:
    alpha = node.attributes.get_float("alpha", 0.2)
    beta = node.attributes.get_float("beta", 0.5)
    return lambda ins, state: (torch.clamp(ins[0] * alpha + beta, 0.0, 1.0),)


@register_op("Gelu")
def _gelu(node: ir.Node, ctx: CompileContext) -> OpFn:
    approximate = node.attributes.get_string("approximate", "none")
    return lambda ins, state: (F.gelu(ins[0], approximate=approximate),)


@register_op("Clip")
def _clip(node: ir.Node, ctx: CompileContext) -> OpFn:
    bounds: list[float | None] = [None, None]
    dynamic: list[int] = []
    if ctx.opset < 11:
        bounds = [node.attributes.get_float("min", -math.inf), node.attributes.get_float("max", math.inf)]
    else:
        for i in (1, 2):
            v = node.inputs[i] if i < len(node.inputs) else None
            if v is None:
                continue
            arr = static_value(v)
            if arr is None:
                dynamic.append(i)
            else:
                bounds[i - 1] = float(np.asarray(arr).reshape(-1)[0])

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        lo, hi = bounds
        if dynamic:
            lo = ins[1] if 1 in dynamic else lo  # type: ignore[assignment]
            hi = ins[2] if 2 in dynamic else hi  # type: ignore[assignment]
        if lo is None and hi is None:
            return (ins[0],)
        return (torch.clamp(ins[0], lo, hi),)

    return run


def _softmax_compiler(fn: Callable[..., torch.Tensor]) -> OpCompiler:
    def compiler(node: ir.Node, ctx: CompileContext) -> OpFn:
        legacy = ctx.opset < 13
        axis = node.attributes.get_int("axis", 1 if legacy else -1)

        def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
            x = ins[0]
            if not legacy:
                return (fn(x, dim=axis),)
            ax = _norm_axis(axis, x.dim())
            flat = x.reshape(int(math.prod(x.shape[:ax])), -1)
            return (fn(flat, dim=1).reshape(x.shape),)

        return run

    return compiler


register_op("Softmax")(_softmax_compiler(torch.softmax))
register_op("LogSoftmax")(_softmax_compiler(torch.log_softmax))


@register_op("Where")
def _where(node: ir.Node, ctx: CompileContext) -> OpFn:
    return lambda ins, state: (torch.where(ins[0], ins[1], ins[2]),)


@register_op("Cast")
def _cast(node: ir.Node, ctx: CompileContext) -> OpFn:
    to = ir.DataType(node.attributes.get_int("to", 1))
    if to not in TORCH_DTYPES:
        raise ModelError(f"Cast '{node.name}' to {to.name} is not supported by the QAT mirror")
    dtype = TORCH_DTYPES[to]
    return lambda ins, state: (ins[0].to(dtype),)


@register_op("CastLike")
def _cast_like(node: ir.Node, ctx: CompileContext) -> OpFn:
    return lambda ins, state: (ins[0].to(ins[1].dtype),)


