"""QAT mirror shape and data-movement ops: Reshape ... Range, with ONNX semantics (``allowzero``, negative
Gather indices, Slice clamping; registered in :mod:`qdq.qat.torch_ops`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from qdq.errors import ModelError
from qdq.qat.torch_ops import (
    CompileContext,
    OpFn,
    Tensors,
    _axes,
    _input,
    _int_list,
    _ints,
    _norm_axis,
    _torch_pad,
    register_op,
    static_value,
)

__all__: list[str] = []  # registers ops with qdq.qat.torch_ops.register_op; nothing to import from here

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


@register_op("GatherND")
def _gather_nd(node: ir.Node, ctx: CompileContext) -> OpFn:
    batch_dims = node.attributes.get_int("batch_dims", 0)

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x, idx = ins[0], ins[1].to(torch.int64)
        b, k = batch_dims, idx.shape[-1]
        batch_shape = tuple(x.shape[:b])
        n_batch = int(torch.tensor(batch_shape).prod()) if b else 1
        data = x.reshape((n_batch, *x.shape[b:]))
        ind = idx.reshape(n_batch, -1, k)
        dims = torch.tensor(x.shape[b:b + k], dtype=torch.int64)
        ind = torch.where(ind < 0, ind + dims, ind)
        rows = torch.arange(n_batch, dtype=torch.int64).reshape(n_batch, 1).expand(n_batch, ind.shape[1])
        out = data[(rows, *(ind[..., j] for j in range(k)))]
        return (out.reshape(tuple(idx.shape[:-1]) + tuple(x.shape[b + k:])),)

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


# --------------------------------------------------------------------------- Resize (the modes torch exports)
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _float_list(t: torch.Tensor | None) -> list[float] | None:
    static = getattr(t, "qdq_static_value", None)
    if static is not None:
        return [float(v) for v in static]
    return None if t is None or t.numel() == 0 else [float(v) for v in t.reshape(-1).tolist()]


def _resize_mode(node: ir.Node) -> tuple[str, bool | None]:
    """(torch interpolate mode, align_corners) for the Resize variants torch's own exports produce, else ModelError."""
    attrs = node.attributes
    mode = attrs.get_string("mode", "nearest")
    coord = attrs.get_string("coordinate_transformation_mode", "half_pixel")
    nearest = attrs.get_string("nearest_mode", "round_prefer_floor")
    policy = attrs.get_string("keep_aspect_ratio_policy", "stretch")
    if node.op_type == "Upsample":
        coord, nearest = "asymmetric", "floor"
    plain = (not attrs.get_int("antialias", 0) and not attrs.get_int("exclude_outside", 0) and policy == "stretch"
             and "axes" not in attrs)
    if plain and mode == "nearest" and coord == "asymmetric" and nearest == "floor":
        return "nearest", None  # F.interpolate(mode="nearest"): src = floor(dst / scale)
    if (plain and mode in ("linear", "cubic") and coord in ("half_pixel", "pytorch_half_pixel", "align_corners")
            and (mode == "linear" or attrs.get_float("cubic_coeff_a", -0.75) == -0.75)):
        return ("linear" if mode == "linear" else "bicubic"), coord == "align_corners"
    raise ModelError(
        f"Resize '{node.name}' (mode {mode}, coordinate_transformation_mode {coord}"
        f"{', nearest_mode ' + nearest if mode == 'nearest' else ''}) has no torch implementation in the QAT mirror: "
        "it runs nearest (asymmetric, floor), linear and cubic (half_pixel or align_corners), as torch exports them")


@register_op("Resize", "Upsample")
def _resize(node: ir.Node, ctx: CompileContext) -> OpFn:
    mode, align = _resize_mode(node)
    old = node.op_type == "Upsample" or ctx.opset < 11  # inputs (X, scales)
    # constant scales / sizes are read now: torch.export then sees plain numbers, not data-dependent reads
    fixed = [static_value(node.inputs[i]) if i < len(node.inputs) else None for i in ((1,) if old else (2, 3))]

    def run(ins: Tensors, state: Any) -> Sequence[torch.Tensor]:
        x = ins[0]
        nd = x.dim() - 2
        if fixed[0] is not None and fixed[0].size:
            scales: list[float] | None = [float(v) for v in fixed[0].reshape(-1)]
        else:
            scales = _float_list(_input(ins, 1 if old else 2))
        if old:
            sizes = None
        elif len(fixed) > 1 and fixed[1] is not None and fixed[1].size:
            sizes = [int(v) for v in fixed[1].reshape(-1)]
        else:
            sizes = _int_list(_input(ins, 3))
        torch_mode = _LINEAR_MODES.get(nd, "") if mode == "linear" else mode
        if nd < 1 or not torch_mode or (mode == "bicubic" and nd != 2):
            raise ModelError(f"Resize '{node.name}': {mode} on a rank-{x.dim()} tensor is not supported by the mirror")
        kw: dict[str, Any] = {} if align is None else {"align_corners": align}
        if sizes:
            if list(sizes[:2]) != list(x.shape[:2]):
                raise ModelError(f"Resize '{node.name}': only the spatial dims may change in the QAT mirror")
            return (F.interpolate(x, size=[int(s) for s in sizes[2:]], mode=torch_mode, **kw),)
        if not scales or scales[:2] != [1.0, 1.0]:
            raise ModelError(f"Resize '{node.name}': scales {scales} must keep batch and channels in the QAT mirror")
        return (F.interpolate(x, scale_factor=scales[2:], mode=torch_mode, **kw),)

    return run
