"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up, so the layer's output on the
calibration inputs changes least.

Each weight ``w = s * (floor(w/s) + f)`` gets a soft rounding ``h(V) = clip(sigmoid(V) * 1.2 - 0.1, 0, 1)``
started at its fractional part ``f`` (so the soft weight starts exact). Adam minimises

    tr((W - W(h)) H (W - W(h))ᵀ) / e_rtn  +  reg * mean(1 - |2h - 1|^β)

where ``H`` is the layer's input Hessian (:mod:`qdq.algorithms.layer_rounding`: the reconstruction error of
the outputs on the calibration inputs, without keeping them), ``e_rtn`` the same error for round-to-nearest
and ``β`` anneals from 20 to 2 after a warm-up, pushing every ``h`` to 0 or 1; the codes are then
``floor(w/s) + [V >= 0]``. Plain numpy (analytic gradients): no torch needed, and the cost is a few
``[outputs x K] @ [K x K]`` products per step, independent of the number of calibration samples.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from qdq.algorithms import register_algorithm
from qdq.algorithms.layer_rounding import LayerRounding
from qdq.errors import ConfigError

__all__ = ["AdaRound", "adaround_round"]

_ZETA, _GAMMA = 1.1, -0.1


def adaround_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: float,
                   qmax: float, *, iters: int = 500, lr: float = 0.02, reg: float = 3.0, warmup: float = 0.2,
                   beta: tuple[float, float] = (20.0, 2.0)) -> np.ndarray:
    """Integer codes for ``w`` ([groups, outputs, inputs]) learned against the Hessians ``h`` ([groups, K, K])."""
    w = w.astype(np.float64)
    s = scale.astype(np.float64)
    z = zero_point.astype(np.float64)
    h = h.astype(np.float64)
    ratio = w / s
    base = np.floor(ratio)
    rtn = np.clip(np.rint(ratio) + z, qmin, qmax)
    e_rtn = w - (rtn - z) * s
    norm = float(np.einsum("goi,gij,goj->", e_rtn, h, e_rtn))
    if norm <= 0 or iters <= 0:
        return rtn
    frac = np.clip(ratio - base, 1e-4, 1 - 1e-4)
    v = -np.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1)  # h(V) = frac
    m = np.zeros_like(v)
    u = np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    start = int(warmup * iters)
    n = v.size
    for step in range(iters):
        sig = 1.0 / (1.0 + np.exp(-v))
        soft = sig * (_ZETA - _GAMMA) + _GAMMA
        hv = np.clip(soft, 0.0, 1.0)
        q = base + hv + z
        inside = (q >= qmin) & (q <= qmax)
        delta = w - (np.clip(q, qmin, qmax) - z) * s
        grad_h = -(2.0 / norm) * np.matmul(delta, h) * s * inside
        if step >= start:
            t = (step - start) / max(iters - start, 1)
            b = beta[0] + (beta[1] - beta[0]) * t
            r = 2.0 * hv - 1.0
            grad_h += (reg / n) * (-b * np.abs(r) ** (b - 1.0) * np.sign(r) * 2.0)
        grad_v = grad_h * (_ZETA - _GAMMA) * sig * (1.0 - sig) * ((soft > 0) & (soft < 1))
        m = b1 * m + (1 - b1) * grad_v
        u = b2 * u + (1 - b2) * grad_v ** 2
        mh = m / (1 - b1 ** (step + 1))
        uh = u / (1 - b2 ** (step + 1))
        v -= lr * mh / (np.sqrt(uh) + eps)
    return np.clip(base + (v >= 0) + z, qmin, qmax)


@register_algorithm("adaround")
class AdaRound(LayerRounding):
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {
        "iters": (int, 500), "lr": (float, 0.02), "reg": (float, 3.0), "warmup": (float, 0.2),
        **LayerRounding.SHARED_OPTIONS}

    def validate(self) -> None:
        super().validate()
        if self.options["iters"] < 1:
            raise ConfigError(f"adaround iters must be >= 1, got {self.options['iters']}")
        if not 0.0 < self.options["lr"] < 1.0:
            raise ConfigError(f"adaround lr must be in (0, 1), got {self.options['lr']}")
        if self.options["reg"] < 0:
            raise ConfigError(f"adaround reg must be >= 0, got {self.options['reg']}")
        if not 0.0 <= self.options["warmup"] < 1.0:
            raise ConfigError(f"adaround warmup must be in [0, 1), got {self.options['warmup']}")

    def codes(self, w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: float,
              qmax: float) -> np.ndarray:
        o = self.options
        return adaround_round(w, h, scale, zero_point, qmin, qmax, iters=o["iters"], lr=o["lr"], reg=o["reg"],
                              warmup=o["warmup"])
