"""QAT mirror ops that compute: Conv / ConvTranspose / Gemm / MatMul / Einsum, pooling, reductions,
normalizations and Dropout, with ONNX semantics (registered in :mod:`qdq.qat.torch_ops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir
import torch
import torch.nn.functional as F

from qdq.errors import ModelError
from qdq.qat.torch_ops import (
    CompileContext,
    OpCompiler,
    OpFn,
    Tensors,
    _axes,
    _input,
    _ints,
    _norm_axis,
    _pool_padding,
    _resolve_pads,
    _torch_pad,
    _unused_extra_outputs,
    register_op,
)

__all__: list[str] = []  # registers ops with qdq.qat.torch_ops.register_op; nothing to import from here

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


