"""Pinned weight qparams: the scale / zero point an algorithm chose for a weight, used instead of a calculator.

A rounding algorithm (GPTQ) picks integer codes on a grid it fixed first, then writes the dequantized
values back as the float weight. Recomputing the grid from those values would move it (their max is no
longer the original max) and re-round every code; the quantizer therefore takes the algorithm's qparams
for that weight, as long as the plan still quantizes it with the same spec and layout.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qdq.calibration.base import QParamsCalculatorBase
from qdq.layout import QLayout
from qdq.qparams import QParams
from qdq.spec import QuantizationSpec

__all__ = ["PinnedCalculator", "PinnedQParams"]


@dataclasses.dataclass
class PinnedQParams:
    """The qparams of one weight, valid for the spec and layout they were computed for."""

    spec: QuantizationSpec
    layout: QLayout
    qparams: QParams
    by: str  # the algorithm that pinned them (notes)

    def applies(self, spec: QuantizationSpec, layout: QLayout) -> bool:
        return spec == self.spec and layout == self.layout


class PinnedCalculator(QParamsCalculatorBase):
    """A calculator that returns pinned qparams (weights only; observing changes nothing)."""

    def __init__(self, pinned: PinnedQParams) -> None:
        super().__init__(pinned.spec, pinned.layout)
        self.pinned = pinned
        self.num_batches = 1

    def observe(self, x: np.ndarray) -> None:
        self.num_batches += 1

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError("pinned qparams have no range")

    def qparams(self) -> QParams:
        return self.pinned.qparams.copy()
