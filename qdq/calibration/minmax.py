"""Min/max calculators: ``static`` (weights), ``moving_average`` (EMA) and ``global_minmax``."""

from __future__ import annotations

from typing import Any

import numpy as np

from qdq.calibration.base import QParamsCalculatorBase, RangeCalculatorBase
from qdq.errors import ConfigError
from qdq.layout import QLayout
from qdq.spec import QuantizationSpec

__all__ = ["GlobalMinMaxCalculator", "MovingAverageCalculator", "StaticCalculator"]


@QParamsCalculatorBase.register("static")
class StaticCalculator(RangeCalculatorBase):
    """Range of the most recent tensor only (weights, which never change during calibration)."""

    def update(self, lo: np.ndarray, hi: np.ndarray) -> None:
        self.min_val, self.max_val = lo, hi


@QParamsCalculatorBase.register("moving_average")
class MovingAverageCalculator(RangeCalculatorBase):
    """EMA of per-batch min/max: ``r = c * batch + (1 - c) * r``; the first batch initialises ``r``."""

    def __init__(self, spec: QuantizationSpec, layout: QLayout, averaging_constant: float = 0.01, **kw: Any) -> None:
        super().__init__(spec, layout, **kw)
        if not 0.0 < float(averaging_constant) <= 1.0:
            raise ConfigError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = np.float32(averaging_constant)

    def update(self, lo: np.ndarray, hi: np.ndarray) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = (c * lo + (np.float32(1) - c) * self.min_val).astype(np.float32)
            self.max_val = (c * hi + (np.float32(1) - c) * self.max_val).astype(np.float32)


@QParamsCalculatorBase.register("global_minmax")
class GlobalMinMaxCalculator(RangeCalculatorBase):
    """Running min and max over every calibration batch."""

    def update(self, lo: np.ndarray, hi: np.ndarray) -> None:
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = np.minimum(self.min_val, lo)
            self.max_val = np.maximum(self.max_val, hi)
