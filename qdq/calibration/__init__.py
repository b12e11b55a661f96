"""Calibration: qparams calculators (streaming statistics) and the onnxruntime runner.

The package itself imports nothing, so :mod:`qdq.calibration.registry` (a leaf) can be imported
by configuration code; the calculator classes (and the built-in calculators, which register
themselves) load on first use of ``qdq.calibration.QParamsCalculatorBase`` (``import qdq`` does).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["QParamsCalculatorBase", "RangeCalculatorBase"]

_BUILTINS = ("qdq.calibration.minmax", "qdq.calibration.histogram", "qdq.calibration.weight_mse")


def __getattr__(name: str) -> Any:
    if name in __all__:
        base = importlib.import_module("qdq.calibration.base")
        for module in _BUILTINS:  # each registers its calculators with qdq.calibration.registry
            importlib.import_module(module)
        return getattr(base, name)
    raise AttributeError(f"module 'qdq.calibration' has no attribute {name!r}")
