"""What coremltools cannot take, refused (named) or rewritten, on the plan and on the prepared model.

Refused (BackendError naming the tensors): float8 and 16-bit anything, per-channel/blocked
activations, 4-bit activations, int4 weights below iOS18, 8-bit per-block weights.
Rewritten (prepared model only, with a :class:`LegalizationNote`): an int4 per-block weight whose
block axis is not a multiple of the block size (coremltools' blockwise op needs whole blocks) is
requantized to int8 symmetric per output channel (an axis shorter than one block is one block: kept). Conv (rank-4) int4 weights are *not* rewritten:
the lowering reads them through a 2-D view that qdq's MIL pass folds back into one INT4 constexpr.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from qdq.backends.lowering import BackendOptions, LegalizationNote
from qdq.dtypes import QDType
from qdq.errors import BackendError
from qdq.passes._qdq_nodes import is_dq, is_q, node_layout, quant_ir_dtype
from qdq.plan import QuantPlan

__all__ = ["legalize", "legalize_plan", "needs_int8"]

logger = logging.getLogger(__name__)

_WEIGHT_DTYPES = frozenset({QDType.INT8, QDType.UINT8, QDType.INT4, QDType.UINT4})
_ACT_DTYPES = frozenset({QDType.INT8, QDType.UINT8})
_INT4 = frozenset({QDType.INT4, QDType.UINT4})
_KEEP8 = "kept at int8 per channel"


def _rule(tensor: str, weight: bool, dtype: QDType, gran: str, options: BackendOptions) -> str | None:
    """Why Core ML cannot take this (tensor, spec), or None."""
    if dtype.is_float:
        return f"{dtype} (Core ML has no float8; use --backend coreai or an int8/int4 preset)"
    if not weight:
        if dtype not in _ACT_DTYPES:
            return f"{dtype} activations (Core ML quantizes activations to int8/uint8 only)"
        if gran != "per_tensor":
            return f"{gran} activations (Core ML quantizes activations per tensor only)"
        return None
    if dtype not in _WEIGHT_DTYPES:
        return f"{dtype} weights (Core ML stores int8/uint8/int4/uint4 weights)"
    if dtype in _INT4 and options.deployment_target != "iOS18":
        return f"{dtype} weights at {options.deployment_target} (4-bit weights need --deployment-target iOS18)"
    if gran == "per_block" and dtype not in _INT4:
        return f"per_block {dtype} weights (Core ML blocks 4-bit weights only; use per_channel)"
    return None


def _raise(problems: dict[str, list[str]]) -> None:
    if not problems:
        return
    parts = []
    for why, tensors in problems.items():
        tensors = list(dict.fromkeys(tensors))
        shown = ", ".join(tensors[:8]) + (f" (+{len(tensors) - 8} more)" if len(tensors) > 8 else "")
        parts.append(f"{why}: {shown}")
    raise BackendError("coreml cannot convert " + "; ".join(parts))


def _check(items: Iterable[tuple[str, bool, QDType, str]], options: BackendOptions) -> None:
    problems: dict[str, list[str]] = {}
    for tensor, weight, dtype, gran in items:
        why = _rule(tensor, weight, dtype, gran, options)
        if why is not None:
            problems.setdefault(why, []).append(tensor)
    _raise(problems)


def legalize_plan(plan: QuantPlan, options: BackendOptions | None = None) -> None:
    """Refuse, before calibration, every planned spec Core ML cannot take (one BackendError naming them all)."""
    options = options or BackendOptions()
    items = []
    for t in plan.targets.values():
        gran = "per_block" if t.layout.block_size is not None else (
            "per_tensor" if t.layout.axis is None else "per_channel")
        items.append((t.tensor, t.kind in ("weight", "constant"), t.spec.dtype, gran))
    _check(items, options)


def _q_sites(model: ir.Model) -> list[tuple[ir.Node, str, bool, QDType, str]]:
    sites = []
    for node in model.graph:
        if not is_q(node):
            continue
        try:
            dtype = QDType.from_ir(quant_ir_dtype(node))
        except KeyError:
            continue
        src = node.inputs[0]
        kind = node.metadata_props.get("qdq.kind")
        weight = kind in ("weight", "constant") if kind else (src is not None and src.const_value is not None)
        rank = len(src.shape) if src is not None and src.shape is not None else 1
        layout = node_layout(node, rank)
        gran = "per_block" if layout.block_size else ("per_tensor" if layout.axis is None else "per_channel")
        name = node.metadata_props.get("qdq.tensor") or (src.name if src is not None else node.name) or ""
        sites.append((node, name, weight, dtype, gran))
    return sites


def legalize(model: ir.Model, options: BackendOptions | None = None) -> list[LegalizationNote]:
    """Check a prepared QDQ model for Core ML and rewrite (in place) what it cannot take as planned.

    Raises BackendError naming every refused tensor before changing anything; returns a note per
    rewritten tensor.
    """
    options = options or BackendOptions()
    sites = _q_sites(model)
    _check(((name, weight, dtype, gran) for _, name, weight, dtype, gran in sites), options)
    notes = []
    for node, name, weight, dtype, gran in sites:
        if not (weight and gran == "per_block"):
            continue
        src = node.inputs[0]
        if src is None or src.const_value is None:
            continue
        shape = tuple(src.const_value.shape.numpy())
        layout = node_layout(node, len(shape))
        assert layout.axis is not None and layout.block_size is not None
        if not needs_int8(shape[layout.axis], layout.block_size):
            continue
        _requantize_int8(model, node, src.const_value.numpy())
        notes.append(LegalizationNote(
            name, _KEEP8,
            f"axis {layout.axis} of {list(shape)} is not a multiple of block size {layout.block_size}: "
            "Core ML's blockwise constexpr needs whole blocks"))
    for note in notes:
        logger.info("coreml legalization: %s", note)
    return notes


def needs_int8(length: int, block: int) -> bool:
    """True when a blocked axis of ``length`` has a partial last block after a full one (Core ML needs equal blocks).

    One partial block (``length < block``) is a single block of ``length``: Core ML takes it.
    """
    return length % block != 0 and length > block


def _requantize_int8(model: ir.Model, q: ir.Node, weight: np.ndarray) -> None:
    """Rewrite Q/DQ of ``weight`` to int8 symmetric per channel on axis 0 (new scale/zero-point initializers)."""
    amax = np.abs(weight.astype(np.float32)).reshape(weight.shape[0], -1).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    key = q.metadata_props.get("qdq.target") or q.name or "weight"
    scale_v = ir.Value(name=f"{key}_coreml_scale", type=ir.TensorType(ir.DataType.FLOAT),
                       shape=ir.Shape(scale.shape), const_value=ir.tensor(scale))
    zp = np.zeros(scale.shape, np.int8)
    zp_v = ir.Value(name=f"{key}_coreml_zero_point", type=ir.TensorType(ir.DataType.INT8),
                    shape=ir.Shape(zp.shape), const_value=ir.tensor(zp))
    model.graph.register_initializer(scale_v)
    model.graph.register_initializer(zp_v)
    out = q.outputs[0]
    old = [v for v in q.inputs[1:3] if v is not None]
    for node in [q, *(u.node for u in out.uses() if is_dq(u.node))]:
        node.replace_input_with(1, scale_v)
        node.replace_input_with(2, zp_v)
        node.attributes.pop("block_size", None)
        node.attributes["axis"] = ir.AttrInt64("axis", 0)
    out.dtype = ir.DataType.INT8
    for v in old:  # the int4 qparams, unless another pair shares them
        if not v.uses() and v.name is not None and v.name in model.graph.initializers:
            model.graph.initializers.pop(v.name)
    spec = q.metadata_props.get("qdq.spec")
    if spec:
        data = json.loads(spec)
        data["dtype"] = "int8"
        data["granularity"] = {"type": "per_channel", "axis": 0}
        data["qscheme"] = "symmetric"
        q.metadata_props["qdq.spec"] = json.dumps(data, sort_keys=True)
