"""Torch fake quantization that matches ONNX QuantizeLinear→DequantizeLinear bit for bit.

Why a custom implementation instead of ``torch.fake_quantize_per_*``: torch's kernels
multiply by ``1/scale`` (ONNX divides), have no float8/per-block variants and clamp to a
caller-given range. Here every step follows the ONNX reference (opset 21):

* integer dtypes: ``q = clamp(round_half_even(x / scale) + zp, qmin, qmax)``,
  ``y = (q - zp) * scale`` — all in float32, division not reciprocal multiplication;
* float8 (e4m3fn / e5m2): ``q = cast_saturate(x / scale)`` (values beyond the largest finite
  number clamp to it, NaN stays NaN, rounding to nearest even by torch's float8 cast),
  ``y = q * scale``;
* per-tensor, per-channel (``axis``) and per-block (``axis`` + ``block_size``, scale of the same
  rank as ``x`` as in ONNX) layouts.

Gradients: straight-through estimator for ``x`` (gradient passes where the unclamped code is
inside ``[qmin, qmax]``, zero outside) and, optionally, the LSQ scale gradient of Esser et al.
(2020), scaled by ``1 / sqrt(numel_per_scale * qmax)``.

:class:`FakeQuantize` wraps this with qparam state and a :mod:`qdq.calibration` calculator that
observes ``x.detach().cpu().numpy()``, so torch-side observation computes exactly the qparams
the ONNX side computes from the same tensors.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from qdq.calibration.base import QParamsCalculatorBase
from qdq.dtypes import QDType
from qdq.errors import ConfigError, DataError
from qdq.layout import QLayout
from qdq.qparams import QParams
from qdq.spec import QuantizationSpec

__all__ = ["FakeQuantize", "expand_param", "fake_quantize", "quantize_codes", "torch_float8_dtype"]

logger = logging.getLogger(__name__)


_PER_TENSOR = QLayout()


def torch_float8_dtype(dtype: QDType) -> torch.dtype:
    """The torch float8 dtype for a float8 QDType."""
    if dtype is QDType.FLOAT8_E4M3FN:
        return torch.float8_e4m3fn
    if dtype is QDType.FLOAT8_E5M2:
        return torch.float8_e5m2
    raise ConfigError(f"{dtype} is not a float8 dtype")


def expand_param(param: torch.Tensor, shape: torch.Size | tuple[int, ...], layout: QLayout) -> torch.Tensor:
    """Broadcast a scale/zero-point of ONNX shape to a tensor of ``shape`` (see :class:`QLayout`)."""
    if layout.axis is None:
        return param.reshape(())
    rank = len(shape)
    if layout.block_size is None:
        view = [1] * rank
        view[layout.axis] = shape[layout.axis]
        return param.reshape(view)
    rep = torch.repeat_interleave(param, layout.block_size, dim=layout.axis)
    return rep.narrow(layout.axis, 0, shape[layout.axis])


def _grid(dtype: QDType, quant_min: float | None, quant_max: float | None) -> tuple[float, float]:
    lo = dtype.qmin if quant_min is None else quant_min
    hi = dtype.qmax if quant_max is None else quant_max
    return float(lo), float(hi)


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: QDType, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (float32 codes, unclamped scaled value ``x/s + z`` before rounding)."""
    v = x / s
    if dtype.is_float:
        # ONNX saturate=True: clamp to ±max finite (NaN propagates through clamp); the zero
        # point is 0 and not added, so -0.0 keeps its sign as in ONNX.
        q = v.clamp(lo, hi).to(torch_float8_dtype(dtype)).to(torch.float32)
        return q, v
    r = torch.round(v) + z
    q = r.clamp(lo, hi)
    # NaN -> qmin, as the ONNX reference and onnxruntime do.
    q = torch.where(torch.isnan(q), torch.full_like(q, lo), q)
    return q, r


def quantize_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: QDType,
    layout: QLayout,
    quant_min: float | None = None,
    quant_max: float | None = None,
) -> torch.Tensor:
    """Quantized codes (as float32 values) of ``x``, exactly ONNX QuantizeLinear's output values."""
    lo, hi = _grid(dtype, quant_min, quant_max)
    x = x.to(torch.float32)
    s = expand_param(scale.to(torch.float32), x.shape, layout)
    z = expand_param(zero_point.to(torch.float32), x.shape, layout)
    return _codes(x, s, z, dtype, lo, hi)[0]


class _FakeQuantFn(torch.autograd.Function):
    """Fake quantization with STE for x and (optionally) the LSQ gradient for scale."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        dtype: QDType,
        layout: QLayout,
        lo: float,
        hi: float,
        grad_factor: float,
    ) -> torch.Tensor:
        s = expand_param(scale, x.shape, layout)
        z = expand_param(zero_point, x.shape, layout)
        q, raw = _codes(x, s, z, dtype, lo, hi)
        y = q * s if dtype.is_float else (q - z) * s
        ctx.save_for_backward(x, q, raw, s, z)
        ctx.meta = (layout, lo, hi, grad_factor, scale.shape, scale.requires_grad)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, q, raw, s, z = ctx.saved_tensors
        layout, lo, hi, grad_factor, scale_shape, _ = ctx.meta
        inside = (raw >= lo) & (raw <= hi)
        grad_x = grad_y * inside.to(grad_y.dtype)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # d y / d s: inside the grid (q - z) - x/s (round is straight-through); outside (q - z).
            d = torch.where(inside, (q - z) - x / s, q - z)
            g = grad_y * d * grad_factor
            grad_scale = _reduce_to_param(g, scale_shape, layout)
        return grad_x, grad_scale, None, None, None, None, None, None


def _reduce_to_param(g: torch.Tensor, scale_shape: torch.Size, layout: QLayout) -> torch.Tensor:
    """Sum a full-shape gradient over each quantization unit (inverse of :func:`expand_param`)."""
    if layout.axis is None:
        return g.sum().reshape(scale_shape)
    if layout.block_size is None:
        dims = [d for d in range(g.dim()) if d != layout.axis]
        return g.sum(dim=dims).reshape(scale_shape)
    ax, bs = layout.axis, layout.block_size
    n = g.shape[ax]
    nblocks = -(-n // bs)
    if n % bs:
        pad_shape = list(g.shape)
        pad_shape[ax] = nblocks * bs - n
        g = torch.cat([g, g.new_zeros(pad_shape)], dim=ax)
    shape = list(g.shape)
    shape[ax : ax + 1] = [nblocks, bs]
    return g.reshape(shape).sum(dim=ax + 1).reshape(scale_shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: QDType,
    layout: QLayout = _PER_TENSOR,
    *,
    quant_min: float | None = None,
    quant_max: float | None = None,
    grad_factor: float | None = None,
) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` in torch, differentiable (STE; LSQ if ``scale`` requires grad).

    Args:
        x: float tensor (computed in float32, returned as float32).
        scale: ONNX-shaped scale (scalar, ``[C]`` or same rank as ``x`` for per-block).
        zero_point: same shape as ``scale``; integer values (any float/int torch dtype).
        dtype: the quantized dtype (decides the grid and float8 casting).
        layout: per-tensor / per-channel / per-block layout.
        quant_min, quant_max: grid override (default: the dtype's full range, as ONNX clamps).
        grad_factor: LSQ gradient scale; default ``1/sqrt(numel_per_scale * qmax)``.
    """
    lo, hi = _grid(dtype, quant_min, quant_max)
    x = x.to(torch.float32)
    scale = scale.to(torch.float32)
    zero_point = zero_point.detach().to(torch.float32)
    if grad_factor is None:
        per_unit = max(1, x.numel() // max(1, scale.numel()))
        grad_factor = 1.0 / math.sqrt(per_unit * max(abs(hi), 1.0))
    return _FakeQuantFn.apply(x, scale, zero_point, dtype, layout, lo, hi, float(grad_factor))


class FakeQuantize(nn.Module):
    """Fake-quant module for one quantized tensor: qparams, an observer and two switches.

    * ``observer_enabled``: each forward feeds ``x`` to the spec's calculator (numpy, the same
      class the ONNX-side calibration uses) and refreshes ``scale``/``zero_point`` from it.
    * ``fake_quant_enabled``: apply :func:`fake_quantize`; otherwise pass ``x`` through.

    ``scale`` is an ``nn.Parameter`` when the spec has ``learnable_scale`` (LSQ), else a buffer;
    ``zero_point`` is always a float32 buffer holding integer values (it is not learned).
    The grid is the dtype's full range, like ONNX QuantizeLinear (a ``symmetric_with_clipping``
    spec only decides the scale), so the mirror matches the exported model bit for bit.
    """

    def __init__(
        self,
        spec: QuantizationSpec,
        layout: QLayout,
        shape: tuple[int, ...] | None = None,
        *,
        is_weight: bool = False,
        qparams: QParams | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.layout = layout
        self.dtype: QDType = spec.dtype
        self.is_weight = is_weight
        self.name = name
        self.observer_enabled = False
        self.fake_quant_enabled = True
        self.calculator = QParamsCalculatorBase.create(spec, layout, is_weight=is_weight)
        pshape = layout.param_shape(tuple(shape)) if shape is not None else ()
        if qparams is not None:
            scale = torch.as_tensor(np.asarray(qparams.scale, np.float32))
            zp = torch.as_tensor(np.asarray(qparams.zero_point).astype(np.float32))
        else:
            scale = torch.ones(pshape, dtype=torch.float32)
            zp = torch.zeros(pshape, dtype=torch.float32)
        if spec.learnable_scale:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zp.clone())
        self.initialized = qparams is not None

    # ------------------------------------------------------------------ switches
    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        self.observer_enabled = bool(enabled)
        return self

    def disable_observer(self) -> FakeQuantize:
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self) -> FakeQuantize:
        return self.enable_fake_quant(False)

    def reset_observer(self) -> None:
        """Forget all statistics (a fresh calculator of the same spec)."""
        self.calculator = QParamsCalculatorBase.create(self.spec, self.layout, is_weight=self.is_weight)

    # ------------------------------------------------------------------ qparams
    def qparams(self) -> QParams:
        """Current scale/zero-point as numpy (scale float32, zero point int32 or float32 for float8)."""
        scale = self.scale.detach().cpu().numpy().astype(np.float32)
        zp = self.zero_point.detach().cpu().numpy()
        zp = zp.astype(np.float32) if self.dtype.is_float else np.rint(zp).astype(np.int32)
        return QParams(scale, zp)

    def set_qparams(self, qparams: QParams) -> None:
        """Overwrite scale/zero-point in place (keeps Parameter identity for optimizers)."""
        scale = torch.as_tensor(np.asarray(qparams.scale, np.float32)).reshape(
            np.shape(qparams.scale)
        )
        zp = torch.as_tensor(np.asarray(qparams.zero_point).astype(np.float32))
        with torch.no_grad():
            if tuple(self.scale.shape) != tuple(scale.shape):
                if isinstance(self.scale, nn.Parameter):
                    self.scale.data = scale.clone()
                else:
                    self.scale = scale.clone()
                self.zero_point = zp.clone().reshape(scale.shape)
            else:
                self.scale.copy_(scale)
                self.zero_point.copy_(zp.reshape(self.zero_point.shape))
        self.initialized = True

    def observe(self, x: torch.Tensor) -> None:
        """Feed one tensor to the calculator and refresh the qparams from it."""
        arr = x.detach().to(torch.float32).cpu().numpy()
        try:
            self.calculator.observe(arr)
        except DataError as exc:
            raise DataError(f"fake-quant '{self.name}': {exc}") from exc
        self.set_qparams(self.calculator.qparams())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.observe(x)
        if not self.fake_quant_enabled:
            return x
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Apply fake quantization at the current qparams (no observation, ignores the switches)."""
        if not self.initialized:
            raise DataError(
                f"fake-quant '{self.name}' has no qparams yet; run calibration batches "
                "(calibration_mode) or load_qparams first"
            )
        return fake_quantize(x, self.scale, self.zero_point, self.dtype, self.layout)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer (or float8) codes ONNX QuantizeLinear produces for ``x``, as float32 values."""
        return quantize_codes(x.detach(), self.scale.detach(), self.zero_point, self.dtype, self.layout)

    def extra_repr(self) -> str:
        lay = "per_tensor" if self.layout.axis is None else (
            f"axis={self.layout.axis}" + (f", block_size={self.layout.block_size}" if self.layout.block_size else "")
        )
        return (
            f"name={self.name!r}, dtype={self.dtype}, {lay}, observer={self.observer_enabled}, "
            f"fake_quant={self.fake_quant_enabled}, learnable={self.spec.learnable_scale}"
        )
