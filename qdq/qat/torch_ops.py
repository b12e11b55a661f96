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

Register your own op::

    @register_op("MyOp", domain="com.example")
    def _my_op(node, ctx):
        alpha = node.attributes.get_float("alpha", 1.0)
        return lambda ins, state: (ins[0] * alpha,)
"""

from __future__ import annotations

import dataclasses
import logging
import math
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


# --------------------------------------------------------------------------- compute ops
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register_op("Conv")
def _conv(node: ir.Node, ctx: CompileContext) -> OpFn:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    group = node.attributes.get_int("group", 1)
    strides, dilations, pads = _ints(node, "strides"), _ints(node, "dilations"), _ints(node, "pads")

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, w, b = ins[0], ins[1], _input(ins, 2)
        nd = w.dim() - 2
        s, d = strides or [1] * nd, dilations or [1] * nd
        p = _resolve_pads(auto_pad, pads, x.shape[2:], w.shape[2:], s, d)
        if p[:nd] == p[nd:]:
            padding = p[:nd]
        else:
            x, padding = F.pad(x, _torch_pad(p, nd)), [0] * nd
        return (_CONV[nd](x, w, b, s, padding, d, group),)

    return run


@register_op("ConvTranspose")
def _conv_transpose(node: ir.Node, ctx: CompileContext) -> OpFn:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad != "NOTSET" or "output_shape" in node.attributes:
        raise ModelError(f"ConvTranspose '{node.name}': auto_pad/output_shape are not supported by the QAT mirror; "
                         "re-export with explicit pads")
    group = node.attributes.get_int("group", 1)
    strides, dilations, pads = _ints(node, "strides"), _ints(node, "dilations"), _ints(node, "pads")
    out_pad = _ints(node, "output_padding")

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, w, b = ins[0], ins[1], _input(ins, 2)
        nd = w.dim() - 2
        p = pads or [0] * (2 * nd)
        if p[:nd] != p[nd:]:
            raise ModelError(f"ConvTranspose '{node.name}': asymmetric pads are not supported by the QAT mirror")
        return (_CONV_T[nd](x, w, b, strides or [1] * nd, p[:nd], out_pad or [0] * nd, group,
                            dilations or [1] * nd),)

    return run


@register_op("Gemm")
def _gemm(node: ir.Node, ctx: CompileContext) -> OpFn:
    alpha = node.attributes.get_float("alpha", 1.0)
    beta = node.attributes.get_float("beta", 1.0)
    trans_a = node.attributes.get_int("transA", 0)
    trans_b = node.attributes.get_int("transB", 0)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        a, b, c = ins[0], ins[1], _input(ins, 2)
        if trans_a:
            a = a.t()
        if alpha == 1.0 and beta == 1.0:
            if trans_b:
                return (F.linear(a, b, c),)
            return ((a @ b) if c is None else torch.addmm(c, a, b),)
        y = alpha * (a @ (b.t() if trans_b else b))
        return (y if c is None else y + beta * c,)

    return run


@register_op("MatMul")
def _matmul(node: ir.Node, ctx: CompileContext) -> OpFn:
    return lambda ins, state: (torch.matmul(ins[0], ins[1]),)


@register_op("Einsum")
def _einsum(node: ir.Node, ctx: CompileContext) -> OpFn:
    eq = node.attributes.get_string("equation", "")
    return lambda ins, state: (torch.einsum(eq, *ins),)


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


# --------------------------------------------------------------------------- pooling / reductions / norms
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_attrs(node: ir.Node) -> tuple[str, list[int], list[int] | None, list[int] | None, list[int] | None, bool]:
    kernel = _ints(node, "kernel_shape")
    if kernel is None:
        raise ModelError(f"{node.op_type} '{node.name}' has no kernel_shape")
    return (node.attributes.get_string("auto_pad", "NOTSET"), kernel, _ints(node, "strides"), _ints(node, "pads"),
            _ints(node, "dilations"), bool(node.attributes.get_int("ceil_mode", 0)))


@register_op("MaxPool")
def _max_pool(node: ir.Node, ctx: CompileContext) -> OpFn:
    _unused_extra_outputs(node, 1)
    auto_pad, kernel, strides, pads, dilations, ceil = _pool_attrs(node)
    nd = len(kernel)
    s, d = strides or [1] * nd, dilations or [1] * nd

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        p = _resolve_pads(auto_pad, pads, x.shape[2:], kernel, s, d)
        x, padding = _pool_padding(x, p, kernel, -math.inf)
        return (_MAX_POOL[nd](x, kernel, s, padding, d, ceil_mode=ceil),)

    return run


@register_op("AveragePool")
def _avg_pool(node: ir.Node, ctx: CompileContext) -> OpFn:
    auto_pad, kernel, strides, pads, dilations, ceil = _pool_attrs(node)
    if dilations is not None and any(v != 1 for v in dilations):
        raise ModelError(f"AveragePool '{node.name}': dilations are not supported by the QAT mirror")
    include = bool(node.attributes.get_int("count_include_pad", 0))
    nd = len(kernel)
    s = strides or [1] * nd

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        p = _resolve_pads(auto_pad, pads, x.shape[2:], kernel, s, [1] * nd)
        begins, ends = p[:nd], p[nd:]
        if begins == ends and all(v <= k // 2 for v, k in zip(begins, kernel)):
            return (_AVG_POOL[nd](x, kernel, s, begins, ceil, include),)
        xp = F.pad(x, _torch_pad(p, nd))
        out = _AVG_POOL[nd](xp, kernel, s, 0, ceil, True)
        if include:
            return (out,)
        ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(p, nd))
        return (out / _AVG_POOL[nd](ones, kernel, s, 0, ceil, True),)

    return run


@register_op("GlobalAveragePool")
def _global_avg_pool(node: ir.Node, ctx: CompileContext) -> OpFn:
    return lambda ins, state: (ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True),)


@register_op("GlobalMaxPool")
def _global_max_pool(node: ir.Node, ctx: CompileContext) -> OpFn:
    return lambda ins, state: (ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True),)


def _reduce_prod(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


_REDUCE: dict[str, Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _reduce_prod,
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
}


def _reduce_compiler(fn: Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]) -> OpCompiler:
    def compiler(node: ir.Node, ctx: CompileContext) -> OpFn:
        keepdims = bool(node.attributes.get_int("keepdims", 1))
        noop = bool(node.attributes.get_int("noop_with_empty_axes", 0))

        def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
            x = ins[0]
            axes = _axes(node, ins, 1)
            if not axes:
                if noop:
                    return (x,)
                axes = list(range(x.dim()))
            return (fn(x, tuple(_norm_axis(a, x.dim()) for a in axes), keepdims),)

        return run

    return compiler


for _name, _rfn in _REDUCE.items():
    register_op(_name)(_reduce_compiler(_rfn))


@register_op("ArgMax", "ArgMin")
def _arg_reduce(node: ir.Node, ctx: CompileContext) -> OpFn:
    axis = node.attributes.get_int("axis", 0)
    keepdims = bool(node.attributes.get_int("keepdims", 1))
    last = bool(node.attributes.get_int("select_last_index", 0))
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        ax = _norm_axis(axis, x.dim())
        if last:
            idx = fn(torch.flip(x, dims=(ax,)), dim=ax, keepdim=keepdims)
            return (x.shape[ax] - 1 - idx,)
        return (fn(x, dim=ax, keepdim=keepdims),)

    return run


@register_op("LayerNormalization")
def _layer_norm(node: ir.Node, ctx: CompileContext) -> OpFn:
    _unused_extra_outputs(node, 1)
    axis = node.attributes.get_int("axis", -1)
    eps = node.attributes.get_float("epsilon", 1e-5)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, scale, bias = ins[0], ins[1], _input(ins, 2)
        ax = _norm_axis(axis, x.dim())
        shape = tuple(x.shape[ax:])
        if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
            return (F.layer_norm(x, shape, scale, bias, eps),)
        dims = tuple(range(ax, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps) * scale
        return (y if bias is None else y + bias,)

    return run


@register_op("BatchNormalization")
def _batch_norm(node: ir.Node, ctx: CompileContext) -> OpFn:
    """Inference statistics, or (module in train mode, batch norm not frozen) batch statistics with
    the running mean/var updated in place, as torch's BatchNorm does (ONNX momentum m -> torch 1-m)."""
    _unused_extra_outputs(node, 1)
    eps = node.attributes.get_float("epsilon", 1e-5)
    momentum = 1.0 - node.attributes.get_float("momentum", 0.9)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, scale, bias, mean, var = ins[:5]
        train = bool(getattr(state, "training", False)) and not getattr(state, "bn_frozen", True) \
            and not getattr(state, "calibrating", False)
        return (F.batch_norm(x, mean, var, scale, bias, train, momentum, eps),)

    return run


@register_op("InstanceNormalization")
def _instance_norm(node: ir.Node, ctx: CompileContext) -> OpFn:
    eps = node.attributes.get_float("epsilon", 1e-5)
    return lambda ins, state: (F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=eps),)


@register_op("Dropout")
def _dropout(node: ir.Node, ctx: CompileContext) -> OpFn:
    _unused_extra_outputs(node, 1)
    return lambda ins, state: (ins[0],)  # the exported graph is an inference graph


# --------------------------------------------------------------------------- shape / data movement
@register_op("Reshape")
def _reshape(node: ir.Node, ctx: CompileContext) -> OpFn:
    allowzero = bool(node.attributes.get_int("allowzero", 0))

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, shape = ins[0], _int_list(ins[1]) or []
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return (x.reshape(shape),)

    return run


@register_op("Transpose")
def _transpose(node: ir.Node, ctx: CompileContext) -> OpFn:
    perm = _ints(node, "perm")
    return lambda ins, state: (ins[0].permute(perm if perm is not None else list(reversed(range(ins[0].dim())))),)


@register_op("Flatten")
def _flatten(node: ir.Node, ctx: CompileContext) -> OpFn:
    axis = node.attributes.get_int("axis", 1)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        ax = _norm_axis(axis, x.dim())
        return (x.reshape(int(math.prod(x.shape[:ax])), int(math.prod(x.shape[ax:]))),)

    return run


@register_op("Concat")
def _concat(node: ir.Node, ctx: CompileContext) -> OpFn:
    axis = node.attributes.get_int("axis", 0)
    return lambda ins, state: (torch.cat([t for t in ins if t is not None], dim=axis),)


@register_op("Squeeze")
def _squeeze(node: ir.Node, ctx: CompileContext) -> OpFn:
    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        axes = _axes(node, ins, 1)
        x = ins[0]
        if axes is None:
            return (x.squeeze(),)
        return (x.squeeze(tuple(_norm_axis(a, x.dim()) for a in axes)),)

    return run


@register_op("Unsqueeze")
def _unsqueeze(node: ir.Node, ctx: CompileContext) -> OpFn:
    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        axes = _axes(node, ins, 1) or []
        rank = x.dim() + len(axes)
        for a in sorted(_norm_axis(a, rank) for a in axes):
            x = x.unsqueeze(a)
        return (x,)

    return run


@register_op("Gather")
def _gather(node: ir.Node, ctx: CompileContext) -> OpFn:
    axis = node.attributes.get_int("axis", 0)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, idx = ins[0], ins[1].to(torch.int64)
        ax = _norm_axis(axis, x.dim())
        idx = torch.where(idx < 0, idx + x.shape[ax], idx)
        out = torch.index_select(x, ax, idx.reshape(-1))
        return (out.reshape(tuple(x.shape[:ax]) + tuple(idx.shape) + tuple(x.shape[ax + 1:])),)

    return run


@register_op("GatherElements")
def _gather_elements(node: ir.Node, ctx: CompileContext) -> OpFn:
    axis = node.attributes.get_int("axis", 0)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, idx = ins[0], ins[1].to(torch.int64)
        ax = _norm_axis(axis, x.dim())
        return (torch.gather(x, ax, torch.where(idx < 0, idx + x.shape[ax], idx)),)

    return run


@register_op("Shape")
def _shape(node: ir.Node, ctx: CompileContext) -> OpFn:
    start = node.attributes.get_int("start", 0)
    end_attr = node.attributes.get("end")
    end = None if end_attr is None else end_attr.as_int()
    return lambda ins, state: (torch.tensor(list(ins[0].shape)[start:end], dtype=torch.int64, device=ins[0].device),)


@register_op("Size")
def _size(node: ir.Node, ctx: CompileContext) -> OpFn:
    return lambda ins, state: (torch.tensor(ins[0].numel(), dtype=torch.int64, device=ins[0].device),)


@register_op("Slice")
def _slice(node: ir.Node, ctx: CompileContext) -> OpFn:
    legacy = ctx.opset < 10

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        if legacy:
            starts, ends = _ints(node, "starts") or [], _ints(node, "ends") or []
            axes, steps = _ints(node, "axes"), None
        else:
            starts, ends = _int_list(ins[1]) or [], _int_list(ins[2]) or []
            axes, steps = _int_list(_input(ins, 3)), _int_list(_input(ins, 4))
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        for start, end, ax, step in zip(starts, ends, axes, steps):
            ax = _norm_axis(ax, x.dim())
            n = x.shape[ax]
            start = start + n if start < 0 else start
            end = end + n if end < 0 else end
            if step > 0:
                start, end = min(max(start, 0), n), min(max(end, 0), n)
                x = x[(slice(None),) * ax + (slice(start, end, step),)] if end > start else x.narrow(ax, 0, 0)
            else:
                start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
                idx = torch.arange(start, end, step, device=x.device)
                x = torch.index_select(x, ax, idx)
        return (x,)

    return run


@register_op("Split")
def _split(node: ir.Node, ctx: CompileContext) -> OpFn:
    axis = node.attributes.get_int("axis", 0)
    n_out = len(node.outputs)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        ax = _norm_axis(axis, x.dim())
        sizes = _ints(node, "split") if ctx.opset < 13 else _int_list(_input(ins, 1))
        if not sizes:
            n = x.shape[ax]
            chunk = -(-n // n_out)
            sizes = [chunk] * (n_out - 1) + [n - chunk * (n_out - 1)]
        return tuple(torch.split(x, sizes, dim=ax))

    return run


@register_op("Expand")
def _expand(node: ir.Node, ctx: CompileContext) -> OpFn:
    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, shape = ins[0], _int_list(ins[1]) or []
        out = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
        return (x.expand(out),)

    return run


@register_op("Tile")
def _tile(node: ir.Node, ctx: CompileContext) -> OpFn:
    return lambda ins, state: (ins[0].repeat(_int_list(ins[1]) or []),)


@register_op("Pad")
def _pad(node: ir.Node, ctx: CompileContext) -> OpFn:
    mode = node.attributes.get_string("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise ModelError(f"Pad '{node.name}': mode {mode!r} is not supported by the QAT mirror")

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        if ctx.opset < 11:
            pads, value, axes = _ints(node, "pads") or [], node.attributes.get_float("value", 0.0), None
        else:
            pads = _int_list(ins[1]) or []
            cv = _input(ins, 2)
            value = float(cv.reshape(-1)[0]) if cv is not None and cv.numel() else 0.0
            axes = _int_list(_input(ins, 3))
        axes = [_norm_axis(a, x.dim()) for a in axes] if axes is not None else list(range(x.dim()))
        full = [0] * (2 * x.dim())
        for i, a in enumerate(axes):
            full[a], full[a + x.dim()] = pads[i], pads[i + len(axes)]
        first = next((a for a in range(x.dim()) if full[a] or full[a + x.dim()]), x.dim())
        nd = x.dim() - first
        if nd == 0:
            return (x,)
        if torch_mode != "constant" and x.dim() >= 3:
            if nd > x.dim() - 2:
                raise ModelError(f"Pad '{node.name}': mode {mode!r} on the first two axes is not supported by the "
                                 "QAT mirror")
            nd, first = x.dim() - 2, 2  # torch pads all spatial axes in these modes
        tp = _torch_pad(full[first:x.dim()] + full[x.dim() + first:], nd)
        if torch_mode == "constant":
            return (F.pad(x, tp, value=value),)
        return (F.pad(x, tp, mode=torch_mode),)

    return run


@register_op("DepthToSpace")
def _depth_to_space(node: ir.Node, ctx: CompileContext) -> OpFn:
    b = node.attributes.get_int("blocksize", 1)
    mode = node.attributes.get_string("mode", "DCR")

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return (y.reshape(n, c // (b * b), h * b, w * b),)

    return run


@register_op("SpaceToDepth")
def _space_to_depth(node: ir.Node, ctx: CompileContext) -> OpFn:
    b = node.attributes.get_int("blocksize", 1)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return (y.reshape(n, c * b * b, h // b, w // b),)

    return run


@register_op("ConstantOfShape")
def _constant_of_shape(node: ir.Node, ctx: CompileContext) -> OpFn:
    attr = node.attributes.get("value")
    value = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
    fill = torch.from_numpy(value.copy())

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        shape = _int_list(ins[0]) or []
        return (fill.to(ins[0].device).reshape(()).expand(shape).clone(),)

    return run


@register_op("Range")
def _range(node: ir.Node, ctx: CompileContext) -> OpFn:
    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        start, limit, delta = (t.reshape(()) for t in ins[:3])
        return (torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device),)

    return run
