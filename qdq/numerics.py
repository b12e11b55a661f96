"""Reference numpy implementation of ONNX QuantizeLinear / DequantizeLinear.

This is the single source of truth for quantization arithmetic in qdq: calculators,
validation, tests and the torch mirror all compare against it. It reproduces
``onnx/reference/ops/op_quantize_linear.py`` / ``op_dequantize_linear.py`` (opset 21+)
bit for bit:

* ``x / scale`` is a float32 *division* (never a multiply by the reciprocal);
* integers: ``clamp(rint(x / scale) + zero_point, qmin, qmax)`` (round half to even);
* float8: ``x / scale`` cast with round-to-nearest-even; ``saturate=True`` clamps to the
  largest finite value first (NaN stays NaN), ``saturate=False`` is the plain cast
  (overflow -> NaN for e4m3fn, -> +-inf for e5m2); the zero point must be 0 and is
  not added (so ``-0.0`` keeps its sign, as in ONNX);
* dequantize: ``(float32(q) - zero_point) * scale`` in float32.

Besides the eight :class:`~qdq.dtypes.QDType` members, any numpy/ml_dtypes integer or
float type ONNX quantizes to (``int2``, ``uint2``, ``float4_e2m1fn``, ...) is accepted
as ``dtype`` so the full ONNX conformance suite can be checked.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from qdq.dtypes import QDType
from qdq.layout import QLayout

__all__ = ["dequantize", "fake_quantize", "quantize", "storage_dtype"]

_PER_TENSOR = QLayout()  # the default layout (QLayout is frozen, so one shared instance is safe)

_FLOAT8 = frozenset(
    np.dtype(t)
    for t in (
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e4m3fnuz,
        ml_dtypes.float8_e5m2fnuz,
    )
)
_SUB_BYTE_INT = frozenset(np.dtype(t) for t in (ml_dtypes.int4, ml_dtypes.uint4, ml_dtypes.int2, ml_dtypes.uint2))


def storage_dtype(dtype: QDType | Any) -> np.dtype:
    """The numpy (ml_dtypes) dtype quantized values are stored in."""
    if isinstance(dtype, QDType):
        return dtype.np_dtype
    return np.dtype(dtype)


def _is_int(dt: np.dtype) -> bool:
    return dt in _SUB_BYTE_INT or np.issubdtype(dt, np.integer)


def _int_range(dt: np.dtype) -> tuple[int, int]:
    info = ml_dtypes.iinfo(dt)
    return int(info.min), int(info.max)


def _expand(param: np.ndarray, shape: tuple[int, ...], layout: QLayout) -> np.ndarray:
    """Broadcast scale/zero-point to ``shape``; a one-element param is per-tensor (as in ONNX)."""
    param = np.asarray(param)
    if param.size == 1 and (layout.axis is None or param.ndim <= 1):
        return param.reshape(())
    if layout.axis is None:
        raise ValueError(
            f"scale/zero_point of shape {param.shape} needs a per-axis or blocked layout (QLayout(axis=...))"
        )
    if layout.block_size is None and param.ndim != 1:
        raise ValueError(f"per-axis scale/zero_point must be 1-D, got shape {param.shape}")
    if layout.block_size is not None and param.ndim != len(shape):
        raise ValueError(
            f"blocked scale/zero_point must have the input's rank {len(shape)}, got shape {param.shape}"
        )
    out = layout.expand(param, shape)
    if np.broadcast_shapes(out.shape, shape) != tuple(shape):
        raise ValueError(f"scale/zero_point of shape {param.shape} does not fit input shape {shape} with {layout}")
    return out


def _zero_point_as(zero_point: np.ndarray, np_float: type) -> np.ndarray:
    zp = np.asarray(zero_point)
    if zp.dtype in _SUB_BYTE_INT:
        zp = zp.astype(np.int32)
    return zp.astype(np_float)


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    dtype: QDType | Any = QDType.UINT8,
    layout: QLayout = _PER_TENSOR,
    saturate: bool = True,
) -> np.ndarray:
    """ONNX QuantizeLinear: quantize float ``x`` to ``dtype`` (returns an array of ``storage_dtype(dtype)``).

    ``zero_point`` may be int32/float32 in the quantized domain or already of the
    quantized dtype; ``saturate`` only matters for float8.
    """
    out_dt = storage_dtype(dtype)
    x = np.asarray(x, dtype=np.float32)
    s = _expand(np.asarray(scale, dtype=np.float32), x.shape, layout)
    y = x / s  # float32 division, exactly as ONNX
    if _is_int(out_dt):
        qmin, qmax = _int_range(out_dt)
        # rint in float32, then add the zero point and clamp in float64: identical to the ONNX
        # reference (int32 arithmetic) wherever that does not overflow, and saturating beyond.
        q = np.rint(y).astype(np.float64)
        if zero_point is not None:
            q = q + _expand(_zero_point_as(zero_point, np.float64), x.shape, layout)
        q = np.where(np.isnan(q), qmin, np.clip(q, qmin, qmax))  # NaN -> qmin, as ONNX reference and ORT
        return q.astype(np.int64).astype(out_dt)
    if out_dt in _FLOAT8:
        if zero_point is not None and np.any(_zero_point_as(zero_point, np.float32) != 0):
            raise ValueError("float8 quantization requires a zero zero_point")
        if saturate:
            info = ml_dtypes.finfo(out_dt)
            y = np.clip(y, np.float32(info.min), np.float32(info.max))
        return y.astype(out_dt)
    # float4 / float6: no inf/NaN encodings, the ml_dtypes cast already saturates.
    if zero_point is not None:
        y = y + _expand(_zero_point_as(zero_point, np.float32), x.shape, layout)
    return y.astype(out_dt)


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    layout: QLayout = _PER_TENSOR,
) -> np.ndarray:
    """ONNX DequantizeLinear: ``(float32(q) - zero_point) * scale`` as float32."""
    q = np.asarray(q)
    if q.dtype in _SUB_BYTE_INT:
        q = q.astype(np.int32)
    dq = q.astype(np.float32)
    if zero_point is not None and q.dtype not in _FLOAT8:
        dq = dq - _expand(_zero_point_as(zero_point, np.float32), q.shape, layout)
    elif zero_point is not None and np.any(_zero_point_as(zero_point, np.float32) != 0):
        raise ValueError("float8 dequantization requires a zero zero_point")
    s = _expand(np.asarray(scale, dtype=np.float32), q.shape, layout)
    return np.asarray(dq * s, dtype=np.float32)


def fake_quantize(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    dtype: QDType | Any = QDType.INT8,
    layout: QLayout = _PER_TENSOR,
    saturate: bool = True,
) -> np.ndarray:
    """``dequantize(quantize(x))``: the float32 values a QDQ pair produces."""
    q = quantize(x, scale, zero_point, dtype, layout, saturate)
    return dequantize(q, scale, zero_point, layout)
