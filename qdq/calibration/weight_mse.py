"""``weight_mse``: a weight's range per quantization unit, shrunk to the clipping that minimises its rounding error.

``static`` maps each channel's / block's min and max onto the grid ends. With few levels (int4: 16) a single
large value stretches the step for the whole unit; clipping it costs less than the coarser step costs every
other value. For each unit (tensor, channel or block, as the layout says) this calculator tries the ranges
``r * [min, max]`` for ``r`` in ``RATIOS`` (1.0 down to 0.5) and keeps the one with the least squared error
``sum((dequantize(quantize(w)) - w)^2)`` (GPTQ/AWQ-style "MSE clipping", data-free). Weights only: it sees
the weight once, at prepare.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from qdq.calibration.base import QParamsCalculatorBase, RangeCalculatorBase
from qdq.layout import QLayout, reduce_minmax
from qdq.qparams import compute_qparams, quant_range

__all__ = ["WeightMSECalculator"]


def _units(x: np.ndarray, layout: QLayout) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` as [units, elements per unit] (a ragged last block padded with its edge values) and the scale shape."""
    if layout.axis is None:
        return x.reshape(1, -1), ()
    ax = layout.axis
    moved = np.moveaxis(x, ax, -1)
    if layout.block_size is None:
        return np.moveaxis(x, ax, 0).reshape(x.shape[ax], -1), (x.shape[ax],)
    bs, n = layout.block_size, x.shape[ax]
    nblocks = -(-n // bs)
    if n % bs:
        pad = [(0, 0)] * (moved.ndim - 1) + [(0, nblocks * bs - n)]
        moved = np.pad(moved, pad, mode="edge")
    blocks = moved.reshape(*moved.shape[:-1], nblocks, bs)
    scale_shape = list(x.shape)
    scale_shape[ax] = nblocks
    # units in the order of the scale array: moved axes then back
    return blocks.reshape(-1, bs), tuple(scale_shape)


def _to_scale_layout(values: np.ndarray, x_shape: tuple[int, ...], layout: QLayout) -> np.ndarray:
    """Per-unit values (in :func:`_units` order) reshaped like the scale."""
    if layout.axis is None:
        return values.reshape(())
    if layout.block_size is None:
        return values.reshape(x_shape[layout.axis])
    ax, bs = layout.axis, layout.block_size
    nblocks = -(-x_shape[ax] // bs)
    moved_shape = [d for i, d in enumerate(x_shape) if i != ax] + [nblocks]
    return np.moveaxis(values.reshape(moved_shape), -1, ax)


@QParamsCalculatorBase.register("weight_mse")
class WeightMSECalculator(RangeCalculatorBase):
    """``static`` with each unit's range clipped to the ratio (of ``RATIOS``) of least rounding error."""

    RATIOS: ClassVar[np.ndarray] = np.linspace(1.0, 0.5, 21, dtype=np.float32)

    def observe(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        self._check_finite(x)
        self._x: np.ndarray | None = x
        self._range: tuple[np.ndarray, np.ndarray] | None = None
        self.min_val, self.max_val = reduce_minmax(x, self.layout)
        self.num_batches += 1

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.min_val is not None and self.max_val is not None
        if getattr(self, "_range", None) is not None:
            return self._range  # type: ignore[return-value]
        x = getattr(self, "_x", None)
        if x is None or self.spec.dtype.is_float:
            return self.min_val, self.max_val
        units, _ = _units(x, self.layout)
        lo_u = units.min(axis=1, keepdims=True)
        hi_u = units.max(axis=1, keepdims=True)
        qmin, qmax = quant_range(self.spec.dtype, self.spec.qscheme)
        best = np.full((units.shape[0], 1), np.inf, np.float64)
        best_r = np.ones((units.shape[0], 1), np.float32)
        for r in self.RATIOS:
            qp = compute_qparams(self.spec, lo_u * r, hi_u * r)
            s, zp = qp.scale.astype(np.float32), qp.zero_point.astype(np.float32)
            q = np.clip(np.rint(units / s) + zp, qmin, qmax)
            err = np.sum(np.square((q - zp) * s - units, dtype=np.float32), axis=1, keepdims=True, dtype=np.float64)
            better = err < best
            best = np.where(better, err, best)
            best_r = np.where(better, r, best_r)
        ratio = _to_scale_layout(best_r.reshape(-1), x.shape, self.layout)
        self._x = None  # the weight is not kept past its qparams
        self._range = ((self.min_val * ratio).astype(np.float32), (self.max_val * ratio).astype(np.float32))
        return self._range
