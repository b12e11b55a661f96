"""Histogram calculators: ``percentile``, ``entropy`` (KL divergence, TensorRT-style) and ``mse``.

Min/max ranges are ruined by a handful of outliers; these calculators pick a clipped range
from the distribution instead. They stream: each keeps one fixed-size histogram per tensor
(``num_bins`` int64 counts, never the activations), so memory does not grow with the number
of calibration batches. Symmetric specs (and float8) histogram ``|x|``; asymmetric specs
histogram ``x``. Per-tensor layouts only: per-channel activation histograms would multiply
the memory and the search cost by the channel count.

Rebinning: bins live on a grid anchored at 0 that always covers 0, bin ``k`` being
``[k * width, (k + 1) * width)`` with ``width`` a power of two. When a batch falls outside the
histogram, the width grows by a power of two ``2**f`` and old bin ``k`` merges into bin
``k >> f``: old bins nest exactly in the new ones, so no count is lost or smeared. The final
grid is the finest power-of-two grid that holds every value seen, whatever the order and the
split of the batches (a batch fed whole or in chunks gives the same histogram), and its
resolution is within a factor 2 of the best one for the range seen.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from qdq.calibration.base import QParamsCalculatorBase
from qdq.errors import ConfigError
from qdq.layout import QLayout
from qdq.numerics import fake_quantize
from qdq.qparams import compute_qparams, quant_range
from qdq.spec import QScheme, QuantizationSpec

__all__ = ["EntropyCalculator", "MSECalculator", "PercentileCalculator"]

_CHUNK = 1 << 16  # elements binned at a time: the scratch buffers (~1.3 MB) stay in cache
_LANES = 4  # interleaved sub-histograms (see _Histogram.add)
_MIN_WIDTH = 2.0**-100  # bin width for an all-zero first batch (grown on the first non-zero batch)
_KL_EPS = 1e-4  # Q count given to an empty bin that receives clipped outliers


def _int_kwarg(owner: str, name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ConfigError(f"calculator '{owner}': {name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


_local = threading.local()


def _scratch(num_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread work buffers for binning: float values, bin indices, and the lane offset of each position."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    if num_bins not in cache:
        offsets = np.tile(np.arange(_LANES, dtype=np.intp) * num_bins, _CHUNK // _LANES)
        cache[num_bins] = (np.empty(_CHUNK, np.float32), np.empty(_CHUNK, np.intp), offsets)
    return cache[num_bins]


class _Histogram:
    """A streaming histogram of ``num_bins`` counts on a 0-anchored grid that always covers 0.

    ``counts[i]`` counts values in ``[(start + i) * width, (start + i + 1) * width)``; ``lo``
    and ``hi`` are the exact extremes of the values seen (so a range never exceeds the data).
    """

    def __init__(self, num_bins: int) -> None:
        self.num_bins = num_bins
        self.counts = np.zeros(num_bins, np.int64)
        self.width = 0.0
        self.start = 0
        self.lo = math.inf
        self.hi = -math.inf

    @property
    def empty(self) -> bool:
        return self.width == 0.0

    def add(self, x: np.ndarray, lo: float, hi: float, absolute: bool) -> None:
        """Count ``|x|`` (``absolute``) or ``x``, whose extremes are ``lo``/``hi``, growing the grid first."""
        self._fit(min(lo, self.lo), max(hi, self.hi))
        self.lo, self.hi = min(lo, self.lo), max(hi, self.hi)
        nb = self.num_bins
        inv_w = np.float32(1.0 / self.width)
        start = np.float32(self.start)
        top = np.float32(nb - 1)
        flat = x.reshape(-1)
        fbuf, ibuf, offsets = _scratch(nb)
        total = np.zeros(_LANES * nb, np.int64)
        for i in range(0, flat.size, _CHUNK):
            chunk = flat[i : i + _CHUNK]
            m = chunk.size
            f, idx = fbuf[:m], ibuf[:m]
            if absolute:  # |x| >= 0 and the grid covers 0, so start == 0
                np.abs(chunk, out=f)
                np.multiply(f, inv_w, out=f)
                np.minimum(f, top, out=f)  # values on (or rounded onto) the top edge: into the last bin
            else:
                # Scale (exact: the width is a power of two) and floor to the absolute bin, then shift by the
                # integer start: integers in float32 subtract exactly, so a value's bin never depends on start.
                np.multiply(chunk, inv_w, out=f)
                np.floor(f, out=f)
                np.subtract(f, start, out=f)
                np.clip(f, 0, top, out=f)
            idx[...] = f  # truncation == floor for f >= 0
            # Consecutive values land in different lanes: a run of equal bins (the zeros after a
            # ReLU) no longer serialises the increments. ~1.5x faster than np.bincount here.
            np.add(idx, offsets[:m], out=idx)
            np.add.at(total, idx, 1)
        self.counts += total.reshape(_LANES, nb).sum(axis=0)

    def _fit(self, lo: float, hi: float) -> None:
        """Grow the grid (merging bins by a power of two) or slide it so it covers [lo, hi] and 0."""
        nb = self.num_bins
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.empty:
            # The smallest power-of-two width that fits: widths stay powers of two when the grid grows,
            # so the final grid (and every count) does not depend on how the data was split into chunks.
            w = 2.0 ** math.ceil(math.log2(max((hi - lo) / (nb - 1), _MIN_WIDTH)))  # nb - 1: always fits
            while w / 2 >= _MIN_WIDTH and math.floor(hi / (w / 2)) - math.floor(lo / (w / 2)) < nb:
                w /= 2
            self.width = w
            self.start = math.floor(lo / self.width)
            return
        occupied = np.flatnonzero(self.counts)
        old_a, old_b = self.start + int(occupied[0]), self.start + int(occupied[-1])
        f = max(0, math.floor(math.log2((hi - lo) / (self.width * nb)))) if hi - lo > self.width * nb else 0
        while True:
            w = self.width * 2.0**f
            a, b = min(math.floor(lo / w), old_a >> f), max(math.floor(hi / w), old_b >> f)
            if b - a < nb:
                break
            f += 1
        if f == 0 and a >= self.start and b < self.start + nb:
            return
        # |start + i| <= nb, so a shift by 62 already merges everything into one bin.
        new_idx = ((self.start + occupied) >> min(f, 62)) - a
        merged = np.zeros(nb, np.int64)
        np.add.at(merged, new_idx, self.counts[occupied])
        self.counts, self.width, self.start = merged, w, a

    def used(self) -> tuple[np.ndarray, int]:
        """Counts from the first to the last occupied bin, widened to include the bin starting at 0,
        and the absolute grid index of the first returned bin."""
        occupied = np.flatnonzero(self.counts)
        zero = -self.start
        first, last = min(int(occupied[0]), zero), max(int(occupied[-1]), zero)
        last = min(last, self.num_bins - 1)
        return self.counts[first : last + 1], self.start + first

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the counts lies, interpolated inside its bin."""
        cum = np.cumsum(self.counts)
        target = q * float(cum[-1])
        if target <= 0:
            return self.lo
        i = min(int(np.searchsorted(cum, target, side="left")), self.num_bins - 1)
        prev = float(cum[i - 1]) if i > 0 else 0.0
        frac = (target - prev) / max(float(self.counts[i]), 1.0)
        value = (self.start + i + frac) * self.width
        return float(min(max(value, self.lo), self.hi))


class _HistogramCalculator(QParamsCalculatorBase):
    """Shared streaming part: validation, ``observe`` and the output range convention."""

    def __init__(self, spec: QuantizationSpec, layout: QLayout, num_bins: int = 2048, **kwargs: Any) -> None:
        super().__init__(spec, layout, **kwargs)
        name = self.registered_name or type(self).__name__
        if not layout.per_tensor:
            raise ConfigError(
                f"calculator '{name}' supports per_tensor activations only; use static/global_minmax for per_channel"
            )
        self.num_bins = _int_kwarg(name, "num_bins", num_bins, 16, 1 << 24)
        #: symmetric specs (and float8, always symmetric) only need |x|: twice the resolution of x
        self.symmetric = spec.dtype.is_float or spec.qscheme is not QScheme.ASYMMETRIC
        self.hist = _Histogram(self.num_bins)
        self._seen_in_batch = False
        self.min_val = math.inf  # signed extremes of x, to clip a symmetric threshold to the data
        self.max_val = -math.inf

    supports_chunks = True  # the histogram is additive: a batch in pieces counts the same

    def observe(self, x: np.ndarray) -> None:
        self.observe_chunk(x)
        self.end_batch()

    def end_batch(self) -> None:
        if self._seen_in_batch:  # empty batches do not count
            self.num_batches += 1
        self._seen_in_batch = False

    def observe_chunk(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        self._seen_in_batch = True
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mn, mx = x.min(), x.max()  # NaN propagates through min/max, so this is the full finite check
        self._check_finite(np.array([mn, mx], np.float64))
        mn, mx = float(mn), float(mx)
        self.min_val, self.max_val = min(self.min_val, mn), max(self.max_val, mx)
        if self.symmetric:
            self.hist.add(x, 0.0, max(-mn, mx), absolute=True)
        else:
            self.hist.add(x, mn, mx, absolute=False)

    def _symmetric_range(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """[-t, t] clipped to the data (same scale: one side always reaches t since t <= max |x|)."""
        return self._range(max(self.min_val, -t), min(self.max_val, t))

    @staticmethod
    def _range(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(lo, np.float32), np.asarray(hi, np.float32)


@QParamsCalculatorBase.register("percentile")
class PercentileCalculator(_HistogramCalculator):
    """Range = the ``percentile`` of ``|x|`` (symmetric) or the ``100 - p`` / ``p`` percentiles of x (asymmetric).

    kwargs: ``percentile`` in (50, 100] (default 99.99), ``num_bins`` (default 2048). The
    percentile is interpolated linearly inside its histogram bin.
    """

    def __init__(
        self, spec: QuantizationSpec, layout: QLayout, percentile: float = 99.99, num_bins: int = 2048, **kw: Any
    ) -> None:
        super().__init__(spec, layout, num_bins=num_bins, **kw)
        ok = isinstance(percentile, (int, float, np.integer, np.floating)) and not isinstance(percentile, bool)
        if not ok or not 50.0 < float(percentile) <= 100.0:
            raise ConfigError(f"calculator 'percentile': percentile must be a number in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        q = self.percentile / 100.0
        if self.symmetric:
            return self._symmetric_range(self.hist.quantile(q))
        return self._range(self.hist.quantile(1.0 - q), self.hist.quantile(q))


def _kl_divergence(h: np.ndarray, a: np.ndarray, b: np.ndarray, nq: int) -> np.ndarray:
    """KL(P || Q) for each candidate window ``[a, b)`` of histogram ``h`` (TensorRT calibration).

    P is ``h[a:b]`` with the counts left of ``a`` added to its first bin and those right of
    ``b`` to its last (clipping). Q is ``h[a:b]`` (without outliers) merged into ``nq`` chunks,
    chunk ``j`` holding bins ``idx - a`` with ``idx * nq // (b - a) == j``, each chunk's count
    spread evenly over its non-empty bins. An empty edge bin that receives outliers gets
    ``_KL_EPS`` counts in Q (the smoothing of MXNet / ONNX Runtime) instead of an infinite
    divergence, so a clipped range may end where the data is sparse. Both distributions are
    normalised by their own totals. Vectorised with cumulative sums: O(len(a) * nq).
    """
    h = h.astype(np.float64)
    c = np.concatenate([[0.0], np.cumsum(h)])
    nzc = np.concatenate([[0], np.cumsum(h > 0)])
    total = c[-1]
    length = b - a
    j = np.arange(nq + 1)
    edges = a[:, None] + (j[None, :] * length[:, None] + nq - 1) // nq  # first bin of chunk j: ceil(j*L/nq)
    s = np.diff(c[edges], axis=1)
    nz = np.diff(nzc[edges], axis=1)
    left, right = c[a], total - c[b]
    q_total = c[b] - c[a]

    def xlogx(v: np.ndarray) -> np.ndarray:
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)

    hlogh = np.concatenate([[0.0], np.cumsum(xlogx(h))])
    log_q = np.log(np.where(s > 0, s, 1.0) / np.maximum(nz, 1))  # per-bin Q count of chunk j (unnormalised)
    log_q_a = np.where(h[a] > 0, log_q[:, 0], math.log(_KL_EPS))
    log_q_b = np.where(h[b - 1] > 0, log_q[:, -1], math.log(_KL_EPS))
    # Unnormalised sums: sum(m log m) and sum(m log q) over P's counts m.
    p_log_p = hlogh[b - 1] - hlogh[a + 1] + xlogx(h[a] + left) + xlogx(h[b - 1] + right)
    p_log_q = (s * log_q).sum(axis=1) + left * log_q_a + right * log_q_b
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (p_log_p - p_log_q) / total + np.log(q_total / total)
    kl[q_total <= 0] = np.inf
    return kl


def _last_argmin(v: np.ndarray) -> int:
    """Index of the minimum, the largest one among ties (the widest range, as NVIDIA's calibrators)."""
    return len(v) - 1 - int(np.argmin(v[::-1]))


@QParamsCalculatorBase.register("entropy")
class EntropyCalculator(_HistogramCalculator):
    """TensorRT-style entropy calibration: the range whose clipped, ``nq``-level quantized histogram
    is closest (KL divergence) to the observed one.

    Symmetric specs search thresholds ``t`` (right edges of ``|x|`` bins, from ``nq`` bins up);
    asymmetric specs search windows ``[lo, hi]`` containing 0 by coordinate descent (hi, then lo,
    twice). As in NVIDIA's calibrators, the count of the bin starting at 0 is replaced by its
    right neighbour's, so a spike of exact zeros (ReLU) does not push the range down; and an
    empty bin receiving clipped outliers gets a tiny Q count (MXNet / ONNX Runtime smoothing)
    rather than an infinite divergence. Like TensorRT's, the result depends on ``num_bins``
    (candidates start at ``nq`` bins) and tends to clip harder than ``mse``.

    kwargs: ``num_bins`` (default 2048), ``num_quantized_bins`` (default: the levels of one sign of
    the grid, 128 for int8 symmetric; all levels, 256, for 8-bit asymmetric). Integer dtypes only.
    """

    def __init__(
        self,
        spec: QuantizationSpec,
        layout: QLayout,
        num_bins: int = 2048,
        num_quantized_bins: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(spec, layout, num_bins=num_bins, **kw)
        if spec.dtype.is_float:
            raise ConfigError(
                f"calculator 'entropy' supports integer dtypes only, got {spec.dtype}; "
                "use mse (models float8 rounding) or percentile"
            )
        qmin, qmax = quant_range(spec.dtype, spec.qscheme)
        default = math.ceil((qmax - qmin) / 2) if self.symmetric else int(qmax - qmin + 1)
        if num_quantized_bins is None:
            if default >= self.num_bins:
                raise ConfigError(
                    f"calculator 'entropy': {spec.dtype} has {default} levels, not fewer than num_bins "
                    f"{self.num_bins}; set calculator_kwargs num_bins above {default} or use mse"
                )
            num_quantized_bins = default
        self.num_quantized_bins = _int_kwarg("entropy", "num_quantized_bins", num_quantized_bins, 2, self.num_bins - 1)

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        counts, first = self.hist.used()
        w, nq = self.hist.width, self.num_quantized_bins
        h = counts.astype(np.float64)
        zero = -first  # index of the bin [0, w)
        if zero + 1 < len(h):
            h[zero] = h[zero + 1]
        n = len(h)
        if n < nq or h.sum() <= 0:
            return self._range(self.min_val, self.max_val)  # fewer bins than levels: nothing to clip
        if self.symmetric:
            b = np.arange(nq, n + 1)
            best = int(b[_last_argmin(_kl_divergence(h, np.zeros_like(b), b, nq))])
            return self._symmetric_range(min((first + best) * w, self.hist.hi))
        lo_i, hi_i = 0, n
        for _ in range(2):
            b = np.arange(max(lo_i + nq, zero), n + 1)
            if len(b):
                hi_i = int(b[_last_argmin(_kl_divergence(h, np.full_like(b, lo_i), b, nq))])
            a = np.arange(0, min(hi_i - nq, zero) + 1)
            if len(a):
                lo_i = int(a[::-1][_last_argmin(_kl_divergence(h, a[::-1], np.full_like(a, hi_i), nq))])
        return self._range(max((first + lo_i) * w, self.min_val), min((first + hi_i) * w, self.max_val))


@QParamsCalculatorBase.register("mse")
class MSECalculator(_HistogramCalculator):
    """Range minimising the expected quantize→dequantize squared error of the observed distribution.

    The error of a candidate range is ``sum(count * (center - fake_quantize(center))**2)`` over
    histogram bins, using :func:`qdq.numerics.fake_quantize` with the spec's own qparams, so it
    includes rounding on the real grid (integer or float8) and clipping. Symmetric: thresholds
    ``t`` in (0, max|x|] (coarse grid of ``num_candidates``, then as many around the best).
    Asymmetric: a joint shrink of [min, max], then hi and lo separately.

    kwargs: ``num_bins`` (default 2048), ``num_candidates`` (default 128).
    """

    def __init__(
        self,
        spec: QuantizationSpec,
        layout: QLayout,
        num_bins: int = 2048,
        num_candidates: int = 128,
        **kw: Any,
    ) -> None:
        super().__init__(spec, layout, num_bins=num_bins, **kw)
        self.num_candidates = _int_kwarg("mse", "num_candidates", num_candidates, 8, 100_000)

    def errors(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Estimated total squared error of quantizing the histogram with each range ``[lo[i], hi[i]]``."""
        counts, first = self.hist.used()
        keep = np.flatnonzero(counts)
        centers = ((first + keep + 0.5) * self.hist.width).astype(np.float32)
        centers = np.clip(centers, self.hist.lo, self.hist.hi)  # the top bin's center may pass the max
        qp = compute_qparams(self.spec, np.asarray(lo, np.float32), np.asarray(hi, np.float32))
        grid = np.broadcast_to(centers, (len(qp.scale), len(centers)))
        fq = fake_quantize(grid, qp.scale, qp.zero_point, self.spec.dtype, QLayout(axis=0))
        return np.square(fq - centers, dtype=np.float64) @ counts[keep].astype(np.float64)

    def _search(self, err: Callable[[np.ndarray], np.ndarray]) -> float:
        """Best ``u`` in (0, 1] for ``err(u)``: a uniform grid, then a finer one around its best point."""
        n = self.num_candidates
        u = np.arange(1, n + 1) / n
        best = float(u[int(np.argmin(err(u)))])
        u = np.clip(best + np.linspace(-1.0, 1.0, n) / n, 1.0 / (n * n), 1.0)
        return float(u[int(np.argmin(err(u)))])

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.symmetric:
            amax = self.hist.hi
            if amax <= 0:
                return self._range(0.0, 0.0)
            t = amax * self._search(lambda u: self.errors(-amax * u, amax * u))
            return self._symmetric_range(t)
        lo0, hi0 = min(self.min_val, 0.0), max(self.max_val, 0.0)
        if hi0 - lo0 <= 0:
            return self._range(0.0, 0.0)
        s = self._search(lambda u: self.errors(lo0 * u, hi0 * u))
        lo, hi = lo0 * s, hi0 * s
        if hi0 > 0:
            hi = hi0 * self._search(lambda u: self.errors(np.full_like(u, lo), hi0 * u))
        if lo0 < 0:
            lo = lo0 * self._search(lambda u: self.errors(lo0 * u, np.full_like(u, hi)))
        return self._range(lo, hi)
