"""What Core AI cannot take, refused before calibration (on the plan) and before lowering (on the prepared model).

Core AI (``coreai::quantize`` / ``dequantize`` / ``constexpr_blockwise_shift_scale``) takes int8, uint8, int4,
uint4 and float8 weights, per tensor, per channel or per block, and 8-bit or float8 activations per tensor or per
channel. Refused with one line naming the tensors: 16-bit anything, sub-byte activations (torch has no 4-bit
activation tensor), per-block activations. The table is :data:`qdq.backends.capabilities.CAPABILITIES`; the ops
pin every bit width (``input_dtype``), so nothing is guessed from value ranges. Rewritten (with a note): a
blocked weight whose axis is not a multiple of the block (``coreai.blockwise_shift_scale`` needs whole blocks;
ONNX allows a partial last one), see :func:`qdq.backends.whole_blocks.whole_blocks`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qdq.backends.capabilities import ExportBackend, check_capabilities, check_plan
from qdq.backends.lowering import BackendOptions, LegalizationNote
from qdq.backends.whole_blocks import whole_blocks
from qdq.errors import BackendError
from qdq.plan import QuantPlan

__all__ = ["check_options", "legalize", "legalize_plan"]

logger = logging.getLogger(__name__)


def check_options(options: BackendOptions) -> None:
    """BackendError for an option Core AI conversion has no use for (a Core ML deployment target, float16)."""
    if options.compute_precision != "float32":
        raise BackendError(f"Core AI conversion computes in float32 (got compute precision "
                           f"{options.compute_precision!r}); --compute-precision is a Core ML option")


def legalize_plan(plan: QuantPlan, options: BackendOptions | None = None) -> None:
    """Refuse, before calibration, every planned spec Core AI cannot take (one BackendError naming them)."""
    check_options(options or BackendOptions())
    check_plan(plan, ExportBackend.CoreAI)


def legalize(model: ir.Model, options: BackendOptions | None = None) -> list[LegalizationNote]:
    """Check a prepared QDQ model for Core AI and rewrite (in place) blocked weights into whole blocks."""
    check_options(options or BackendOptions())
    check_capabilities(model, ExportBackend.CoreAI)
    notes = whole_blocks(model, "Core AI")
    for note in notes:
        logger.info("coreai legalization: %s", note)
    return notes
