"""Weights in whole blocks: re-block (or widen to int8) what ONNX may block and Core ML / Core AI may not.

ONNX's blocked QuantizeLinear allows a partial last block (``ceil(axis / block)`` scales); the blockwise
constexpr ops of Core ML (``constexpr_blockwise_shift_scale``) and Core AI (``coreai.blockwise_shift_scale``)
need the block to divide the axis. :func:`whole_blocks` rewrites each such weight on the prepared model:

* re-blocked at the largest block dividing both the axis and the planned block (e.g. 16 for 240 channels in
  blocks of 32), same dtype and scheme, per-block min/max of the float weight, when it is at least
  :data:`MIN_BLOCK`;
* otherwise requantized to int8 symmetric per output channel (axis 0).

An axis shorter than one block is one block: kept. Each rewrite returns a :class:`LegalizationNote`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir

from qdq.backends.lowering import LegalizationNote
from qdq.errors import BackendError
from qdq.passes._qdq_nodes import is_dq, is_q, node_layout, quant_ir_dtype
from qdq.qparams import compute_qparams

__all__ = ["MIN_BLOCK", "needs_whole_blocks", "whole_blocks"]

#: The smallest block a weight is re-blocked to (below it, 4-bit blocks cost more scales than they save).
MIN_BLOCK = 8
_KEEP8 = "kept at int8 per channel"


def whole_blocks(model: ir.Model, backend: str) -> list[LegalizationNote]:
    """Rewrite (in place) every blocked constant weight of ``model`` whose axis has a partial last block.

    ``backend`` names the converter in the notes ("Core ML", "Core AI").
    """
    notes = []
    for node in list(model.graph):
        src = node.inputs[0] if is_q(node) and node.inputs else None
        if src is None or src.const_value is None or "block_size" not in node.attributes:
            continue
        shape = tuple(src.const_value.shape.numpy())
        layout = node_layout(node, len(shape))
        if layout.axis is None or layout.block_size is None:
            continue
        length, block = shape[layout.axis], layout.block_size
        if not needs_whole_blocks(length, block):
            continue
        name = node.metadata_props.get("qdq.tensor") or src.name or node.name or ""
        weight = src.const_value.numpy()
        why = (f"axis {layout.axis} of {list(shape)} is not a multiple of block size {block}: "
               f"{backend}'s blockwise constexpr needs whole blocks")
        smaller = math.gcd(length, block)
        if smaller >= MIN_BLOCK:
            _reblock(model, node, weight, layout.axis, smaller)
            dtype = node.metadata_props.get("qdq.spec") and json.loads(node.metadata_props["qdq.spec"]).get("dtype")
            notes.append(LegalizationNote(name, f"re-blocked at {smaller} (still {dtype or 'the same dtype'})", why))
        else:
            _requantize_int8(model, node, weight)
            notes.append(LegalizationNote(name, _KEEP8, why + f" and no block of {MIN_BLOCK}+ divides {length}"))
    return notes


def needs_whole_blocks(length: int, block: int) -> bool:
    """True when a blocked axis of ``length`` has a partial last block after a full one (Core ML / Core AI need equal blocks).

    One partial block (``length < block``) is a single block of ``length``: both take it.
    """
    return length % block != 0 and length > block


def _reblock(model: ir.Model, q: ir.Node, weight: np.ndarray, axis: int, block: int) -> None:
    """Requantize the Q/DQ of ``weight`` in blocks of ``block`` (which divides the axis) with the pair's own
    dtype and scheme (min/max of each block), replacing its scale/zero-point initializers."""
    from qdq.spec import QuantizationSpec

    spec_json = q.metadata_props.get("qdq.spec")
    if not spec_json:
        raise BackendError(f"'{q.name}': a blocked weight without qdq's spec metadata cannot be re-blocked; "
                           "prepare the model with qdq")
    spec = QuantizationSpec.from_dict(json.loads(spec_json))
    w = np.moveaxis(weight.astype(np.float32), axis, -1)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    lo, hi = np.moveaxis(blocks.min(axis=-1), -1, axis), np.moveaxis(blocks.max(axis=-1), -1, axis)
    qp = compute_qparams(spec, lo, hi)
    zp_old = q.inputs[2]
    zp_type = zp_old.dtype if zp_old is not None and zp_old.dtype is not None else quant_ir_dtype(q)
    _replace_qparams(model, q, qp.scale.astype(np.float32), qp.zero_point, zp_type, axis, block, "reblock")
    data = json.loads(spec_json)
    data["granularity"] = {"type": "per_block", "axis": axis, "block_size": block}
    q.metadata_props["qdq.spec"] = json.dumps(data, sort_keys=True)


def _replace_qparams(model: ir.Model, q: ir.Node, scale: np.ndarray, zero_point: np.ndarray, zp_type: ir.DataType,
                     axis: int, block: int | None, tag: str) -> None:
    """New scale / zero-point initializers for ``q`` and its DQs (axis, block_size set; old ones dropped if unused)."""
    key = q.metadata_props.get("qdq.target") or q.name or "weight"
    scale_v = ir.Value(name=f"{key}_coreml_{tag}_scale", type=ir.TensorType(ir.DataType.FLOAT),
                       shape=ir.Shape(scale.shape), const_value=ir.tensor(scale))
    zp = ir.tensor(np.asarray(zero_point).astype(zp_type.numpy()), dtype=zp_type)
    zp_v = ir.Value(name=f"{key}_coreml_{tag}_zero_point", type=ir.TensorType(zp_type),
                    shape=ir.Shape(scale.shape), const_value=zp)
    model.graph.register_initializer(scale_v)
    model.graph.register_initializer(zp_v)
    out = q.outputs[0]
    old = [v for v in q.inputs[1:3] if v is not None]
    for node in [q, *(u.node for u in out.uses() if is_dq(u.node))]:
        node.replace_input_with(1, scale_v)
        node.replace_input_with(2, zp_v)
        if block is None:
            node.attributes.pop("block_size", None)
        else:
            node.attributes["block_size"] = ir.AttrInt64("block_size", block)
        node.attributes["axis"] = ir.AttrInt64("axis", axis)
    out.dtype = zp_type
    for v in old:  # the previous qparams, unless another pair shares them
        if not v.uses() and v.name is not None and v.name in model.graph.initializers:
            model.graph.initializers.pop(v.name)


def _requantize_int8(model: ir.Model, q: ir.Node, weight: np.ndarray) -> None:
    """Rewrite Q/DQ of ``weight`` to int8 symmetric per channel on axis 0 (new scale/zero-point initializers)."""
    amax = np.abs(weight.astype(np.float32)).reshape(weight.shape[0], -1).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    _replace_qparams(model, q, scale, np.zeros(scale.shape, np.int8), ir.DataType.INT8, 0, None, "int8")
    spec = q.metadata_props.get("qdq.spec")
    if spec:
        data = json.loads(spec)
        data["dtype"] = "int8"
        data["granularity"] = {"type": "per_channel", "axis": 0}
        data["qscheme"] = "symmetric"
        q.metadata_props["qdq.spec"] = json.dumps(data, sort_keys=True)
