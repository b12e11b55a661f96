"""GPTQ (Frantar et al. 2023): round weights one input column at a time, pushing each rounding error onto the
columns not yet rounded, weighted by the layer's input Hessian.

For a layer ``y = W x`` (``W``: outputs x inputs) and calibration inputs ``X``, the output error of quantized
weights ``Q`` is ``tr((W - Q) H (W - Q)ᵀ)`` with ``H = XᵀX / n``. Round-to-nearest minimises each weight's own
error; GPTQ minimises this one: quantize column ``i`` (all outputs at once), then update the remaining columns
by ``-(w_i - q_i) / [H⁻¹]_ii · [H⁻¹]_i,>i`` (the optimal compensation, through the Cholesky factor of ``H⁻¹``),
in blocks of ``block`` columns. ``act_order`` visits columns by decreasing ``H_ii`` (the inputs that matter most
are rounded first, while there is most freedom left to compensate). ``damp`` adds ``damp * mean(diag H)`` to
the diagonal.

The grid is fixed before rounding: each weight's scale / zero point comes from its planned calculator on the
original weight (per tensor, channel or block, any integer dtype and qscheme) and is pinned, so the quantizer
stores exactly the codes GPTQ chose; the float model gets their dequantized values. Layers: MatMul and Gemm
with a constant 2-D weight (``XᵀX`` over every row of the input), Conv 2-D with any stride, padding, dilation
and groups (im2col patches, one Hessian per group: a depthwise 3x3 conv has a 9x9 Hessian per channel).
Statistics stream: onnxruntime passes fetch the layer inputs batch by batch (as many layers per pass as keep
one batch's fetched inputs under ``fetch_mb``) and only the Hessians and input sums are kept (``K x K`` and
``K`` per layer, float64). Inputs are those of the float model; ``sequential`` instead runs one pass per
layer input, on the model rounded so far (slower; on EfficientNet-Lite0 and MiniLM no better).

``bias_correction`` (default on) then adds the rounded weights' mean output error on the calibration inputs,
``(W - Q) E[x]``, to the layer's bias (Conv/Gemm bias, or the Add after a MatMul; a Conv without one gets it):
round-to-nearest int4 on EfficientNet-Lite0 keeps 4 % top-1 without bias correction, GPTQ alone 71.7 %,
GPTQ with it 82.0 % (symmetric) / 89.3 % (asymmetric; FP32 90.2). The quantizer's own bias correction then
finds nothing left to correct for these weights (their float values are their dequantized codes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qdq.algorithms import register_algorithm
from qdq.algorithms.layer_rounding import LayerRounding
from qdq.errors import ConfigError, DataError

__all__ = ["GPTQ", "gptq_round"]


def gptq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: float, qmax: float,
               *, damp: float = 0.01, block: int = 128, act_order: bool = True) -> np.ndarray:
    """Integer codes for ``w`` ([groups, outputs, inputs]) given Hessians ``h`` ([groups, inputs, inputs]) and the
    per-element grid ``scale`` / ``zero_point`` (shaped like ``w``)."""
    g, _, k = w.shape
    w = w.astype(np.float64).copy()
    s = scale.astype(np.float64)
    z = zero_point.astype(np.float64)
    h = h.astype(np.float64).copy()
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    if dead.any():
        gi, ii = np.nonzero(dead)
        h[gi, ii, ii] = 1.0
        diag = np.einsum("gii->gi", h)
    perm = np.argsort(-diag, axis=1, kind="stable") if act_order else np.tile(np.arange(k), (g, 1))
    take = perm[:, None, :]
    w, s, z = (np.take_along_axis(a, take, axis=2) for a in (w, s, z))
    h = np.take_along_axis(np.take_along_axis(h, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    u = _inverse_cholesky_upper(h, damp)
    codes = np.empty_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, :, i1:i2].copy()
        e1 = np.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, :, i]
            si, zi = s[:, :, i1 + i], z[:, :, i1 + i]
            q = np.clip(np.rint(col / si) + zi, qmin, qmax)
            codes[:, :, i1 + i] = q
            err = (col - (q - zi) * si) / u1[:, i, i][:, None]
            w1[:, :, i:] -= err[:, :, None] * u1[:, None, i, i:]
            e1[:, :, i] = err
        if i2 < k:
            w[:, :, i2:] -= e1 @ u[:, i1:i2, i2:]
    out = np.empty_like(codes)
    np.put_along_axis(out, take, codes, axis=2)
    return out


def _inverse_cholesky_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``H⁻¹ = UᵀU``), raising ``λ`` until ``H`` is positive definite."""
    k = h.shape[-1]
    mean_diag = np.einsum("gii->g", h) / k
    eye = np.eye(k)
    for factor in (1.0, 10.0, 100.0, 1000.0):
        try:
            damped = h + (damp * factor * mean_diag)[:, None, None] * eye
            inv = np.linalg.inv(damped)
            inv = (inv + inv.transpose(0, 2, 1)) / 2
            return np.linalg.cholesky(inv).transpose(0, 2, 1)
        except np.linalg.LinAlgError:
            continue
    raise DataError("gptq: a layer's input Hessian is not positive definite even with damping; check the data")


@register_algorithm("gptq")
class GPTQ(LayerRounding):
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {
        "damp": (float, 0.01), "block": (int, 128), "act_order": (bool, True), **LayerRounding.SHARED_OPTIONS}

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.options["damp"] < 1.0:
            raise ConfigError(f"gptq damp must be in (0, 1), got {self.options['damp']}")
        if self.options["block"] < 1:
            raise ConfigError(f"gptq block must be >= 1, got {self.options['block']}")

    def codes(self, w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: float,
              qmax: float) -> np.ndarray:
        return gptq_round(w, h, scale, zero_point, qmin, qmax, damp=self.options["damp"],
                          block=self.options["block"], act_order=self.options["act_order"])
