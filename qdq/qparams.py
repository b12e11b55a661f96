"""Scale and zero-point from a float range, with coreai_opt's conventions.

| dtype  | qscheme                 | grid        | scale           | zero point           |
|--------|-------------------------|-------------|-----------------|----------------------|
| int8   | symmetric               | [-128, 127] | max_abs / 127.5 | 0                    |
| int8   | symmetric_with_clipping | [-127, 127] | max_abs / 127   | 0                    |
| uint8  | symmetric(_w_clipping)  | [0, 255]    | max_abs / 127.5 | 128                  |
| any    | asymmetric              | [qmin,qmax] | range / (qmax-qmin) | qmin - round(min/scale) |
| float8 | symmetric               | +-fp_max    | max_abs / fp_max| 0                    |
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qdq.dtypes import QDType
from qdq.spec import QScheme, QuantizationSpec

__all__ = ["QParams", "compute_qparams", "quant_range"]

_EPS = np.float32(np.finfo(np.float32).eps)


@dataclasses.dataclass
class QParams:
    """Scale (float32) and zero point (stored in the quantized dtype's integer domain as int32/float32)."""

    scale: np.ndarray
    zero_point: np.ndarray

    def copy(self) -> QParams:
        return QParams(self.scale.copy(), self.zero_point.copy())


def quant_range(dtype: QDType, qscheme: QScheme) -> tuple[float, float]:
    """The integer grid [qmin, qmax] a spec quantizes to."""
    if qscheme is QScheme.SYMMETRIC_WITH_CLIPPING and dtype.is_signed and not dtype.is_float:
        return dtype.qmin + 1, dtype.qmax
    return dtype.qmin, dtype.qmax


def compute_qparams(spec: QuantizationSpec, min_val: np.ndarray, max_val: np.ndarray) -> QParams:
    """Scale/zero-point for observed ``[min_val, max_val]`` (arrays of the scale's shape)."""
    lo = np.minimum(np.asarray(min_val, np.float32), 0).astype(np.float32)
    hi = np.maximum(np.asarray(max_val, np.float32), 0).astype(np.float32)
    if spec.float_range is not None:
        flo, fhi = spec.float_range
        if flo is not None:
            lo = np.full_like(lo, flo)
        if fhi is not None:
            hi = np.full_like(hi, fhi)
    dtype = spec.dtype
    qmin, qmax = quant_range(dtype, spec.qscheme)
    if dtype.is_float:
        max_abs = np.maximum(-lo, hi)
        scale = np.maximum(max_abs / np.float32(dtype.qmax), _EPS).astype(np.float32)
        return QParams(scale, np.zeros_like(scale, dtype=np.float32))
    if spec.qscheme is QScheme.ASYMMETRIC:
        scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
        scale = np.maximum(scale, _EPS)
        zp = np.clip(qmin - np.round(lo / scale), qmin, qmax)
        return QParams(scale.astype(np.float32), zp.astype(np.int32))
    max_abs = np.maximum(-lo, hi)
    if spec.qscheme is QScheme.SYMMETRIC_WITH_CLIPPING and dtype.is_signed:
        denom = np.float32(qmax)
    else:
        denom = np.float32((qmax - qmin) / 2)
    scale = np.maximum((max_abs / denom).astype(np.float32), _EPS)
    zp_value = 0 if dtype.is_signed else (qmin + qmax + 1) // 2
    return QParams(scale.astype(np.float32), np.full(scale.shape, zp_value, np.int32))
