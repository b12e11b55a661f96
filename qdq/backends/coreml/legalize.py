"""What coremltools cannot take, refused (named) or rewritten, on the plan and on the prepared model.

Refused (BackendError naming the tensors): float8 and 16-bit anything, per-channel/blocked
activations, 4-bit activations, int4 weights below iOS18, 8-bit per-block weights.
Rewritten (prepared model only, with a :class:`LegalizationNote`): an int4 per-block weight whose
block axis is not a multiple of the block size (coremltools' blockwise op needs whole blocks, ONNX
allows a partial last one) is re-blocked, still 4-bit, at the largest block dividing both (e.g. 16
for 240 channels in blocks of 32) when that is at least 8, else requantized to int8
symmetric per output channel (:func:`qdq.backends.whole_blocks.whole_blocks`). An axis shorter than one
block is one block: kept. Conv (rank-4) int4
weights are not rewritten: the lowering reads them through a 2-D view that qdq's MIL pass folds back
into one INT4 constexpr.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_ir as ir

from qdq.backends.capabilities import planned_tensors, quantized_tensors
from qdq.backends.lowering import BackendOptions, LegalizationNote
from qdq.backends.whole_blocks import whole_blocks
from qdq.dtypes import QDType
from qdq.errors import BackendError
from qdq.plan import QuantPlan

__all__ = ["legalize", "legalize_plan"]

logger = logging.getLogger(__name__)

_WEIGHT_DTYPES = frozenset({QDType.INT8, QDType.UINT8, QDType.INT4, QDType.UINT4})
_ACT_DTYPES = frozenset({QDType.INT8, QDType.UINT8})
_INT4 = frozenset({QDType.INT4, QDType.UINT4})


def _rule(tensor: str, role: str, dtype: QDType, gran: str, options: BackendOptions) -> str | None:
    """Why Core ML cannot take this (tensor, spec), or None (``role``: "weight" or "activation")."""
    if dtype.is_float:
        return f"{dtype} (Core ML has no float8; use --backend coreai or an int8/int4 preset)"
    if role != "weight":
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


def _check(items: Iterable[tuple[str, str, QDType, str]], options: BackendOptions) -> None:
    problems: dict[str, list[str]] = {}
    for tensor, role, dtype, gran in items:
        why = _rule(tensor, role, dtype, gran, options)
        if why is not None:
            problems.setdefault(why, []).append(tensor)
    _raise(problems)


def legalize_plan(plan: QuantPlan, options: BackendOptions | None = None) -> None:
    """Refuse, before calibration, every planned spec Core ML cannot take (one BackendError naming them all)."""
    _check(planned_tensors(plan), options or BackendOptions())


def legalize(model: ir.Model, options: BackendOptions | None = None) -> list[LegalizationNote]:
    """Check a prepared QDQ model for Core ML and rewrite (in place) what it cannot take as planned.

    Raises BackendError naming every refused tensor before changing anything; returns a note per
    rewritten tensor.
    """
    _check(quantized_tensors(model), options or BackendOptions())
    notes = whole_blocks(model, "Core ML")
    for note in notes:
        logger.info("coreml legalization: %s", note)
    return notes
