"""Calibration: qparams calculators (streaming statistics) and the onnxruntime runner."""

from qdq.calibration.base import QParamsCalculatorBase, RangeCalculatorBase
from qdq.calibration import minmax as _minmax  # noqa: F401  (registers builtins)
from qdq.calibration import histogram as _histogram  # noqa: F401

__all__ = ["QParamsCalculatorBase", "RangeCalculatorBase"]
