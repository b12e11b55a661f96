"""Accuracy metrics of a quantized model's outputs against FP32, streamed batch by batch, and the report.

Per output: SQNR (signal power ``sum(ref**2)`` over noise power ``sum((ref - quant)**2)``, in
dB), mean per-sample cosine similarity, largest absolute difference, top-1 agreement where the
output looks like class scores ([N, classes]) and, given labels, both models' top-1 accuracy.
Accumulators keep a few float64 sums, never the outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qdq.errors import ModelError

__all__ = ["CompareReport", "Cosine", "Counter", "LayerMetrics", "NeighbourAgreement", "OutputMetrics", "ScoreSample",
           "Sqnr", "agreement_estimate", "agreement_interval", "expected_agreement", "flip_probabilities",
           "is_linear_head", "neighbour_agreement", "sqnr_db", "top1"]

logger = logging.getLogger(__name__)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10*log10(sum(ref^2) / sum((ref-test)^2))`` in dB (inf if equal)."""
    acc = Sqnr()
    acc.update(np.asarray(ref), np.asarray(test))
    return acc.db


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class Sqnr:
    """Running signal and noise power (float64) plus the largest absolute difference."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.shape != test.shape:
            raise ModelError(f"reference shape {ref.shape} != quantized shape {test.shape}; compare the same model")
        r = ref.astype(np.float64, copy=False).ravel()
        d = r - test.astype(np.float64, copy=False).ravel()
        self.signal += float(np.dot(r, r))
        self.noise += float(np.dot(d, d))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))

    @property
    def db(self) -> float:
        return _db(self.signal, self.noise)


#: ops whose output's last axis is features: a [N, S, classes] graph output they write holds per-token scores
LINEAR_HEADS = frozenset({"MatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat"})


def is_linear_head(op_type: str | None, input_ops: Sequence[str | None]) -> bool:
    """Whether an op writes a linear layer's output: a MatMul/Gemm, or the bias Add of a constant to a MatMul's output
    (``input_ops``: the op types producing its inputs, "Constant" for an initializer; a residual Add is not one)."""
    if op_type in LINEAR_HEADS:
        return True
    return op_type == "Add" and len(input_ops) == 2 and sorted(
        "linear" if op in LINEAR_HEADS else op or "" for op in input_ops) == ["Constant", "linear"]


def top1(x: np.ndarray) -> np.ndarray | None:
    """Argmax per sample for outputs that look like class scores ([N, classes], 2+ float classes), else None."""
    if x.ndim != 2 or x.shape[-1] < 2 or x.dtype.kind != "f":
        return None
    return np.argmax(x, axis=-1)


class Cosine:
    """Mean over samples of the cosine similarity between FP32 and quantized outputs (flattened per sample).

    Two all-zero samples count as 1, one all-zero sample against a non-zero one as 0. ``samples``
    is the batch's sample count: an output whose dim 0 is not that (a scalar, a pooled vector)
    counts as one sample per batch.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, ref: np.ndarray, test: np.ndarray, samples: int) -> None:
        rows = samples if ref.ndim and ref.shape[0] == samples and samples > 0 else 1
        r = ref.astype(np.float64, copy=False).reshape(rows, -1)
        t = test.astype(np.float64, copy=False).reshape(rows, -1)
        dot = np.einsum("ij,ij->i", r, t)
        norms = np.sqrt(np.einsum("ij,ij->i", r, r) * np.einsum("ij,ij->i", t, t))
        both_zero = norms == 0
        cos = np.where(both_zero, 0.0, dot / np.where(both_zero, 1.0, norms))
        zr, zt = ~r.any(axis=1), ~t.any(axis=1)
        cos = np.where(zr & zt, 1.0, cos)
        self.total += float(np.clip(cos, -1.0, 1.0).sum())
        self.count += rows

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


class _FirstRows:
    """The first ``limit`` rows of an output from both models (rows x features floats each: per-sample results,
    not activations), for metrics that need every row at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ref: list[np.ndarray] = []
        self.test: list[np.ndarray] = []
        self.count = 0

    def keep(self, ref: np.ndarray, test: np.ndarray) -> None:
        take = min(len(ref), self.limit - self.count)
        if take > 0:
            self.ref.append(np.asarray(ref[:take], np.float32))
            self.test.append(np.asarray(test[:take], np.float32))
            self.count += take

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.ref), np.concatenate(self.test)


class NeighbourAgreement(_FirstRows):
    """For embedding outputs ([N, D] float, not class scores): the fraction of samples whose nearest other sample
    by cosine similarity is the same under the quantized model as under FP32 (retrieval behaviour kept).

    Keeps the first ``limit`` embeddings of each model (N x D floats: a retrieval index, not activations)."""

    def __init__(self, limit: int = 4096) -> None:
        super().__init__(limit)

    def update(self, ref: np.ndarray, test: np.ndarray, samples: int) -> None:
        if ref.ndim != 2 or ref.shape[0] != samples or ref.shape[-1] < 2 or ref.dtype.kind != "f":
            return
        self.keep(ref, test)

    @property
    def rate(self) -> float | None:
        if self.count < 3:
            return None
        return neighbour_agreement(*self.rows())


def _nearest(e: np.ndarray) -> np.ndarray:
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    return np.argmax(sims, axis=1)


def neighbour_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same in ``test`` as in ``ref`` ([N, D] each)."""
    return float(np.mean(_nearest(ref) == _nearest(test)))


def flip_probabilities(ref: np.ndarray, test: np.ndarray, *, max_errors: int = 256, chunk: int = 32) -> np.ndarray:
    """Per sample ``i``: the share of observed errors ``test[j] - ref[j]`` (up to ``max_errors`` of them, evenly
    spaced) that change its top-1 when added to its FP32 scores ``ref[i]``: how likely quantization noise of the
    kind measured flips that sample. ``ref``/``test``: ``[N, classes]``; returns ``[N]`` in 0..1."""
    ref = np.asarray(ref, np.float32).reshape(len(ref), -1)
    err = np.asarray(test, np.float32).reshape(len(test), -1) - ref
    if len(err) > max_errors:
        err = err[np.linspace(0, len(err) - 1, max_errors).round().astype(int)]
    labels = ref.argmax(-1)
    kept = np.empty(len(ref), np.float64)
    chunk = max(1, min(chunk, (64 << 20) // max(err.nbytes, 1)))  # rows x errors x classes under 64 MB per step
    for i in range(0, len(ref), chunk):
        rows = ref[i:i + chunk, None, :] + err[None, :, :]  # [chunk, errors, classes]
        kept[i:i + chunk] = np.count_nonzero(rows.argmax(-1) == labels[i:i + chunk, None], axis=1)
    return 1.0 - kept / max(len(err), 1)


def expected_agreement(ref: np.ndarray, test: np.ndarray, *, max_errors: int = 256, chunk: int = 32) -> float:
    """Top-1 agreement (%) to expect on new samples: every FP32 score row ``ref[i]`` plus every observed error
    ``test[j] - ref[j]`` (up to ``max_errors`` of them, evenly spaced), counted as agreeing when its top-1 stays.

    Agreement counted on the samples themselves moves in steps of one sample and hinges on the few near-ties
    among them (a FP32 margin of 0.006 flips under any quantization); pairing each margin with every error
    treats errors and margins as independent, which smooths the estimate and does not overfit which samples
    happen to be near-ties. ``ref``/``test``: ``[N, classes]``."""
    return 100.0 * (1.0 - float(np.mean(flip_probabilities(ref, test, max_errors=max_errors, chunk=chunk))))


def agreement_interval(flips: np.ndarray, level: float = 0.9) -> tuple[float, float]:
    """Central ``level`` interval (%) of the agreement counted on these samples when each sample ``i`` flips
    independently with probability ``flips[i]`` (:func:`flip_probabilities`): how far the counted agreement of
    another quantization with the same error level may land from this one's, on the same samples."""
    p = np.clip(np.asarray(flips, np.float64).ravel(), 0.0, 1.0)
    n = len(p)
    if n == 0:
        return 100.0, 100.0
    dist = np.zeros(n + 1)
    dist[0] = 1.0
    for k, q in enumerate(p, start=1):  # Poisson-binomial: number of flips
        dist[1:k + 1] = dist[1:k + 1] * (1.0 - q) + dist[:k] * q
        dist[0] *= 1.0 - q
    cdf = np.cumsum(dist)
    tail = (1.0 - level) / 2
    lo_flips = int(np.searchsorted(cdf, tail - 1e-12))
    hi_flips = int(np.searchsorted(cdf, 1.0 - tail - 1e-12))
    return 100.0 * (n - min(hi_flips, n)) / n, 100.0 * (n - lo_flips) / n


def agreement_estimate(ref: np.ndarray, test: np.ndarray, level: float = 0.9) -> tuple[float, tuple[float, float]]:
    """(:func:`expected_agreement`, :func:`agreement_interval`) from one :func:`flip_probabilities` pass, in %."""
    flips = flip_probabilities(ref, test)
    return 100.0 * (1.0 - float(np.mean(flips))), agreement_interval(flips, level)


class ScoreSample(_FirstRows):
    """For class-score outputs: keeps the first ``limit`` FP32 and quantized rows, for
    :func:`agreement_estimate` at the end (``limit`` x classes floats each)."""

    def __init__(self, limit: int = 1024) -> None:
        super().__init__(limit)

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        self.keep(ref, test)

    def result(self, level: float = 0.9) -> tuple[float, tuple[float, float]] | None:
        """(expected agreement %, ``level`` interval of the counted one %) on the kept rows, or None if too few."""
        return agreement_estimate(*self.rows(), level) if self.count >= 2 else None


class Counter:
    """Matches over comparisons, e.g. top-1 agreement or correct predictions."""

    def __init__(self) -> None:
        self.hits = 0
        self.total = 0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        self.hits += int(np.count_nonzero(a == b))
        self.total += int(a.size)

    @property
    def rate(self) -> float | None:
        return self.hits / self.total if self.total else None


@dataclass(frozen=True)
class OutputMetrics:
    """One model output: SQNR, cosine, top-1 agreement and (with labels) both accuracies, rates in 0..1."""

    name: str
    sqnr_db: float
    max_abs_diff: float
    top1_agreement: float | None = None  #: None unless the output looks like class scores [N, classes]
    fp32_accuracy: float | None = None  #: None without labels or when the output is not [N, classes]
    quant_accuracy: float | None = None
    cosine: float | None = None  #: mean per-sample cosine similarity of FP32 and quantized outputs
    #: embedding outputs [N, D]: each sample's nearest other sample (cosine) is the same with both models
    neighbour_agreement: float | None = None
    #: class scores: top-1 agreement to expect on new samples (:func:`expected_agreement`, first 1024 samples)
    expected_agreement: float | None = None
    #: class scores: 90 % interval of the counted agreement under the same error level (:func:`agreement_interval`)
    agreement_range: tuple[float, float] | None = None
    #: integer / bool outputs (ids, argmax, masks): the fraction of elements equal to FP32's
    exact_match: float | None = None


@dataclass(frozen=True)
class LayerMetrics:
    """One quantized activation: FP32 tensor ``name`` vs its QuantizeLinear->DequantizeLinear output."""

    name: str
    sqnr_db: float
    max_abs_diff: float
    node: str  #: the QuantizeLinear node


@dataclass
class CompareReport:
    """Result of :func:`compare`; ``layers`` is sorted worst (lowest SQNR) first."""

    num_samples: int
    outputs: list[OutputMetrics]
    layers: list[LayerMetrics] = field(default_factory=list)
    skipped_layers: list[str] = field(default_factory=list)  #: quantized tensors missing from the FP32 model
    optimization: str = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become the strings "inf", "-inf", "nan"."""
        return _json_safe(asdict(self))

    def format(self) -> str:
        """Readable text tables: per output, then per quantized activation (worst first)."""
        lines = [(f"compared {self.num_samples} samples (onnxruntime {', '.join(self.providers)}, "
                 f"graph optimization: {self.optimization})")]
        has_acc = any(o.fp32_accuracy is not None for o in self.outputs)
        has_nn = any(o.neighbour_agreement is not None for o in self.outputs)
        has_exp = any(o.expected_agreement is not None for o in self.outputs)
        has_exact = any(o.exact_match is not None for o in self.outputs)
        head = ["output", "SQNR dB", "cosine", "top-1 agree"] + (["expected (90 % range)"] if has_exp else [])
        head += ["max |diff|"] + (["NN agree"] if has_nn else []) + (["equal"] if has_exact else [])
        head += ["FP32 acc", "quant acc", "delta"] if has_acc else []
        rows = []
        for o in self.outputs:
            cos = "-" if o.cosine is None else f"{o.cosine:.4f}"
            row = [o.name, _fmt_db(o.sqnr_db), cos, _fmt_pct(o.top1_agreement)]
            row += [expected_text(o)] if has_exp else []
            row += [f"{o.max_abs_diff:.4g}"]
            row += [_fmt_pct(o.neighbour_agreement)] if has_nn else []
            row += [_fmt_pct(o.exact_match)] if has_exact else []
            if has_acc:
                delta = (None if o.fp32_accuracy is None or o.quant_accuracy is None
                         else o.quant_accuracy - o.fp32_accuracy)
                row += [_fmt_pct(o.fp32_accuracy), _fmt_pct(o.quant_accuracy),
                        "-" if delta is None else f"{100 * delta:+.2f} pt"]
            rows.append(row)
        lines += _table(head, rows)
        if self.layers:
            lines += ["", f"per-layer SQNR, worst first ({len(self.layers)} quantized activations):"]
            lines += _table(["tensor", "SQNR dB", "max |diff|", "QuantizeLinear"],
                            [[m.name, _fmt_db(m.sqnr_db), f"{m.max_abs_diff:.4g}", m.node] for m in self.layers])
        if self.skipped_layers:
            lines.append(f"not in the FP32 model, skipped: {', '.join(self.skipped_layers)}")
        return "\n".join(lines)


def _fmt_db(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:.2f}"


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def expected_text(o: OutputMetrics) -> str:
    """``99.29 % (98.77-99.59)``: expected agreement and the 90 % range of the counted one."""
    if o.expected_agreement is None:
        return "-"
    if o.agreement_range is None:
        return _fmt_pct(o.expected_agreement)
    lo, hi = o.agreement_range
    return f"{_fmt_pct(o.expected_agreement)} ({100 * lo:.2f}-{100 * hi:.2f})"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
