"""Automatic fallback to an accuracy target: leave the fewest ops float until the quantized model meets it.

:func:`search_fallback` takes a calibrated :class:`~qdq.quantizer.Quantizer` and measurement batches (the
first calibration samples: ``qdq quantize --target-agreement 99.5`` uses ``--holdout`` of them):

1. **Sensitivity.** For every quantized op (every node a target was planned for) the model is re-planned
   with that op alone left float (``op_name_configs: {op: null}``) and measured; its output SQNR ranks the
   ops (a continuous proxy: agreement on a few hundred samples moves in steps of one sample). Re-planning reuses the collected statistics (:meth:`Quantizer.replan`): no candidate
   is ever recalibrated, and one that would need new statistics is not a candidate. A layer a rounding
   algorithm (GPTQ, AdaRound) changed gets its original weight and bias back when left float, as in the rebuild.
   Candidates run without the biases an after-calibration algorithm (``sequential_bias_correction``) moved:
   those were computed for the fully quantized model and are wrong once ops go float (kept, they had the
   search top out below the target with 28 ops float on EfficientNet-Lite0); ``qdq.quantize`` rebuilds the
   chosen config, which computes them again for it.
2. **Fewest ops.** The smallest prefix of that ranking that meets the target (binary search), then every
   chosen op is tried back quantized and dropped from the set if the target still holds. A target no set meets
   becomes the metric of every candidate changed, less the smallest gain that counts (one sample of agreement,
   0.1 dB, 1e-4 cosine); none is changed when that is no better than the fully quantized model.
3. **Raise before float.** Where an op's weight is 4-bit, per-tensor or per-block, steps 1-2 first try it with
   int8 per-channel weights instead of float (activations unchanged, so the statistics still hold); only if
   that cannot meet the target are ops left float. A ``w4`` model keeps its int4 layers where they do no harm
   and int8 where they do, instead of float copies.

Metrics on the model's first output against FP32: ``agreement`` (top-1 agreement, %, classifier outputs
``[N, classes]``: the lower of the agreement counted on the samples and :func:`~qdq.metrics.expected_agreement`,
every sample's FP32 margin against every sample's quantization error — counted alone, the search fixes the
few near-ties it happens to measure and the target misses on new data: EfficientNet-Lite0 99.61 % on the
calibration photos, 98.77 % on held-out ones), ``sqnr`` (dB) or ``cosine`` (mean per sample). Candidates run finalized for onnxruntime, with its full
optimization (its int8 kernels: what ships); the result is the config (base + ``op_name_configs``
entries a user can read, edit and pass back with ``--config``) and its quantizer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qdq.backends import ExportBackend
from qdq.config import ModuleQuantizerConfig, QuantizerConfig
from qdq.dtypes import QDType
from qdq.errors import ConfigError, DataError
from qdq.metrics import expected_agreement, is_linear_head, sqnr_db
from qdq.model_inputs import model_inputs
from qdq.passes.annotate import config_resolver
from qdq.progress import progress_bar
from qdq.quantizer import Quantizer
from qdq.session import make_session, run_batched
from qdq.spec import PerChannelGranularity, QuantizationSpec
from qdq.validate import token_mask

__all__ = ["METRICS", "FallbackResult", "search_fallback"]

logger = logging.getLogger(__name__)

METRICS = ("agreement", "sqnr", "cosine")


@dataclasses.dataclass
class FallbackResult:
    metric: str
    target: float
    before: float  #: the fully quantized model
    after: float  #: with ``ops`` left float
    ops: list[str]  #: left float, in graph order
    candidates: int  #: quantized ops considered
    evaluations: int
    config: QuantizerConfig
    quantizer: Quantizer
    speed_cost: float | None = None  #: time with fallback / time fully quantized (onnxruntime, one batch)
    sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)  #: output SQNR, only that op changed
    raised: list[str] = dataclasses.field(default_factory=list)  #: weights raised to int8 per channel instead

    def remeasure(self, quantizer: Quantizer, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Measure ``quantizer`` (the chosen config, calibrated afresh) on the search's samples: it becomes
        :attr:`quantizer` and its metric :attr:`after`."""
        self.after, _ = _Evaluator(quantizer, batches, self.metric)(quantizer)
        self.quantizer = quantizer

    @property
    def reached(self) -> bool:
        return self.after >= self.target

    def summary(self) -> str:
        unit = {"agreement": " %", "sqnr": " dB", "cosine": ""}[self.metric]
        fmt = "{:.4f}" if self.metric == "cosine" else "{:.2f}"
        head = (f"target {self.metric} >= {fmt.format(self.target)}{unit}: "
                f"{fmt.format(self.before)} -> {fmt.format(self.after)}{unit} with {len(self.ops)} of "
                f"{self.candidates} quantized ops float")
        ops = f": {', '.join(self.ops)}" if self.ops else ""
        if self.raised:
            ops += f"; {len(self.raised)} with int8 per-channel weights instead: {', '.join(self.raised)}"
        if not self.reached:
            head += (" (not reached: no candidate set meets it; these ops get closest)" if self.ops or self.raised
                     else " (not reached: no candidate set meets it or improves on the fully quantized model)")
        speed = "" if self.speed_cost is None else f"; time x{self.speed_cost:.2f} of the fully quantized model"
        return head + ops + speed + f" ({self.evaluations} evaluations)"


def _op_of(value: Any) -> str | None:
    """The op type producing ``value`` ("Constant" for an initializer, None for a graph input)."""
    if value is None:
        return None
    producer = value.producer()
    return producer.op_type if producer is not None else "Constant" if value.const_value is not None else None


#: rows of token logits the expected agreement is estimated on (evenly spaced; the count uses every token)
_ESTIMATE_ROWS = 1024


def _score(metric: str, ref: np.ndarray, out: np.ndarray) -> float:
    if metric == "agreement":  # the lower of the count and the estimate for new samples (no overfitting to ties)
        if ref.ndim == 3:  # [N, S, vocab] logits: per token
            ref, out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
        counted = float(np.mean(ref.argmax(-1) == out.argmax(-1)) * 100)
        rows = np.linspace(0, len(ref) - 1, min(len(ref), _ESTIMATE_ROWS)).astype(np.int64)
        return min(counted, expected_agreement(ref[rows], out[rows]))
    if metric == "sqnr":
        return sqnr_db(ref, out)
    r = ref.reshape(len(ref), -1).astype(np.float64)
    o = out.reshape(len(out), -1).astype(np.float64)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    return float(np.mean(np.sum(r * o, axis=1) / np.maximum(denom, 1e-30)))


class _Evaluator:
    def __init__(self, quantizer: Quantizer, batches: Sequence[Mapping[str, np.ndarray]], metric: str) -> None:
        if metric not in METRICS:
            raise ConfigError(f"fallback metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not batches:
            raise DataError("the fallback search needs measurement samples: the calibration data is empty")
        self.batches = [dict(b) for b in batches]
        self.metric = metric
        self.count = 0
        self.inputs = model_inputs(quantizer.float_model)  # static batches run in chunks of the model's batch
        # the float model before rounding: GPTQ / AdaRound moved the weights of quantizer.float_model
        ref = self._outputs(make_session(quantizer.reference_model(), label="FP32 model"))
        first = quantizer.float_model.graph.outputs[0].producer()
        token_logits = ref.ndim == 3 and first is not None and is_linear_head(first.op_type, [_op_of(v) for v in
                                                                                             first.inputs])
        if metric == "agreement" and (not (ref.ndim == 2 or token_logits) or ref.shape[-1] < 2):
            raise ConfigError(f"--target-agreement needs class scores [N, classes] (or token logits [N, S, vocab]) as "
                              f"the first output (got shape {list(ref.shape)}); use --target-sqnr or --target-cosine")
        self.ref = ref
        # token logits: the padding positions of the samples (attention_mask) are left out of the agreement
        self.mask: np.ndarray | None = None
        masks = [token_mask(b, self.inputs.batch_len(b) or 0) for b in self.batches]
        if metric == "agreement" and ref.ndim == 3 and all(m is not None for m in masks):
            joined = np.concatenate([m.reshape(-1) for m in masks if m is not None])
            self.mask = joined if joined.size == ref.shape[0] * ref.shape[1] else None

    def _outputs(self, session: Any) -> np.ndarray:
        name = session.get_outputs()[0].name
        outs = [np.asarray(run_batched(session, b, self.inputs, [name])[0], np.float32) for b in self.batches]
        if len({o.shape[1:] for o in outs}) > 1 and all(o.ndim >= 2 for o in outs):
            outs = [o.reshape(-1, o.shape[-1]) for o in outs]  # batches of different lengths: joined by row
        try:
            return np.concatenate(outs)
        except ValueError as exc:
            raise DataError(f"the search samples give first outputs of different shapes ({outs[0].shape}, ...) that "
                            "cannot be joined; give calibration batches of one shape") from exc

    @staticmethod
    def _session(quantizer: Quantizer) -> Any:
        # the finalized model: what ships (a prepared float8 QDQ graph is mis-fused by onnxruntime's optimizer)
        return make_session(quantizer.finalize(ExportBackend.ONNXRuntime), label="candidate")

    def __call__(self, quantizer: Quantizer) -> tuple[float, float]:
        """(the target metric, output SQNR): SQNR ranks candidates (agreement on a few hundred samples moves
        in steps of one sample)."""
        self.count += 1
        out = self._outputs(self._session(quantizer))
        ref, test = self.ref, out
        if self.mask is not None:  # token logits without their padding positions
            ref, test = (a.reshape(-1, a.shape[-1])[self.mask] for a in (ref, out))
        return _score(self.metric, ref, test), _score("sqnr", self.ref, out)

    def seconds(self, quantizer: Quantizer, repeats: int = 5) -> float:
        session = self._session(quantizer)
        feeds = self.batches[0]
        run_batched(session, feeds, self.inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run_batched(session, feeds, self.inputs)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def _with_float_ops(config: QuantizerConfig, ops: Sequence[str],
                    raised: Mapping[str, ModuleQuantizerConfig] | None = None) -> QuantizerConfig:
    """``config`` with ``ops`` left float, or given their raised config where ``raised`` has one."""
    names = dict(config.op_name_configs)
    for op in ops:
        names[op] = (raised or {}).get(op)
    return dataclasses.replace(config, op_name_configs=names)


def _raised_spec(spec: QuantizationSpec) -> QuantizationSpec | None:
    """A weight spec at the next precision onnxruntime runs as fast: 4-bit -> 8-bit and per-tensor / per-block ->
    per-channel (8-bit per-channel weights are what its integer kernels read). None when already there."""
    wide = {QDType.INT4: QDType.INT8, QDType.UINT4: QDType.UINT8}.get(spec.dtype, spec.dtype)
    if wide.is_float:
        return None
    per_channel = spec.granularity.to_dict()["type"] == "per_channel"
    if wide == spec.dtype and per_channel:
        return None
    return spec.replace(dtype=wide, granularity=spec.granularity if per_channel else PerChannelGranularity())


def _raised_configs(quantizer: Quantizer, ops: Sequence[str]) -> dict[str, ModuleQuantizerConfig]:
    """Per op with a 4-bit, per-tensor or per-block weight: its config with that weight raised (everything else,
    activations included, as it was: the statistics collected for them still hold)."""
    weighted = {op for t in quantizer.plan.targets.values() if t.kind == "weight" for op in t.ops}
    resolve = config_resolver(quantizer.config, quantizer.float_model.graph)
    nodes = {n.name: n for n in quantizer.float_model.graph}
    out: dict[str, ModuleQuantizerConfig] = {}
    for op in ops:
        cfg = resolve(nodes[op]) if op in weighted else None
        if cfg is None or not cfg.op_state_spec:
            continue
        specs = {k: _raised_spec(v) if v is not None else None for k, v in cfg.op_state_spec.items()}
        if any(v is not None for v in specs.values()):
            out[op] = dataclasses.replace(cfg, op_state_spec={
                k: specs[k] or v for k, v in cfg.op_state_spec.items()})
    return out


Trial = Callable[[Sequence[str]], "tuple[float, float, Quantizer] | None"]


def _fewest(ops: Sequence[str], target: float, trial: Trial, progress: bool,
            tolerance: float = 0.0) -> tuple[list[str], float, dict[str, float]]:
    """(chosen ops, their metric, sensitivity): ops ranked by the output SQNR with that op alone changed, the
    smallest ranked prefix meeting ``target`` (binary search), then each chosen op put back when the target
    holds without it. When no set meets it, the same search for the best metric every candidate changed reaches,
    less ``tolerance`` (the smallest gain that counts: one sample of agreement, 0.1 dB, 1e-4 cosine), and none
    when that is no better than the fully quantized model (ops float for nothing)."""
    sensitivity: dict[str, float] = {}
    for op in progress_bar(ops, desc="sensitivity", unit="op", disable=not progress):
        if (t := trial([op])) is not None:
            sensitivity[op] = t[1]
    ranked = sorted(sensitivity, key=lambda op: -sensitivity[op])
    top = trial(ranked)
    base = trial([])[0]  # type: ignore[index]
    if top is not None and top[0] < target:  # unreachable: the fewest ops that get about as close as all do
        target = top[0] - tolerance
    if top is None or target <= base:  # nothing to gain: changing ops does not move the metric enough
        return [], base, sensitivity
    lo, hi = 1, len(ranked)
    while lo < hi:  # smallest k whose top-k prefix meets the target
        mid = (lo + hi) // 2
        t = trial(ranked[:mid])
        if t is not None and t[0] >= target:
            hi = mid
        else:
            lo = mid + 1
    best = ranked[:lo]
    for op in list(best)[::-1]:  # minimal: an op whose removal keeps the target goes back to quantized
        rest = [o for o in best if o != op]
        t = trial(rest)
        if t is not None and t[0] >= target:
            best = rest
    return best, trial(best)[0], sensitivity  # type: ignore[index]


def quantized_ops(quantizer: Quantizer) -> list[str]:
    """Node names a target was planned for, in graph order (what a fallback can leave float)."""
    asked = {op for t in quantizer.plan.targets.values() for op in t.ops}
    return [n.name for n in quantizer.float_model.graph if n.name in asked]


def search_fallback(quantizer: Quantizer, batches: Sequence[Mapping[str, np.ndarray]], *, metric: str,
                    target: float, progress: bool = True, measure_speed: bool = True,
                    on_progress: Callable[[str], None] | None = None) -> FallbackResult:
    """The fewest ops of ``quantizer``'s config to leave float so that ``metric`` >= ``target`` on ``batches``."""
    evaluate = _Evaluator(quantizer, batches, metric)
    base_cfg = quantizer.config
    before, _ = evaluate(quantizer)
    ops = quantized_ops(quantizer)
    cache: dict[frozenset[tuple[str, bool]], tuple[float, float, Quantizer] | None] = {}
    if not quantizer.calibrated_corrections:
        cache[frozenset()] = (before, math.inf, quantizer)

    def trial(chosen: Sequence[str], raised: Mapping[str, ModuleQuantizerConfig]) -> tuple[float, float, Quantizer] | None:
        """(metric, output SQNR, quantizer) with ``chosen`` ops raised (where ``raised`` has them) or float."""
        key = frozenset((op, op in raised) for op in chosen)
        if key not in cache:
            # without sequential_bias_correction's biases: computed for the fully quantized model, they are wrong
            # once ops go float (the rebuild of the chosen config computes them again)
            candidate = quantizer.replan(_with_float_ops(base_cfg, chosen, raised), calibrated_algorithms=False)
            if candidate.missing_statistics:
                cache[key] = None
            else:
                score, db = evaluate(candidate)
                cache[key] = (score, db, candidate)
        return cache[key]

    result = FallbackResult(metric, target, before, before, [], len(ops), 0, base_cfg, quantizer)
    if before >= target or not ops:
        result.evaluations = evaluate.count
        return result
    raised = _raised_configs(quantizer, ops)
    tolerance = {"agreement": 100.0 / len(evaluate.ref), "sqnr": 0.1, "cosine": 1e-4}[metric]
    chosen, score, sensitivity = _fewest(ops, target, lambda chosen: trial(chosen, raised), progress, tolerance)
    if score < target and raised:  # raising precision is not enough: leave ops float instead
        chosen, score, sensitivity = _fewest(ops, target, lambda chosen: trial(chosen, {}), progress, tolerance)
        raised = {}
    result.sensitivity = sensitivity  # nothing chosen: the model as it was (after-calibration corrections too)
    if chosen:
        final = trial(chosen, raised)
        assert final is not None
        chosen_q = final[2]
        order = {op: i for i, op in enumerate(ops)}
        chosen = sorted(chosen, key=order.__getitem__)
        result = FallbackResult(metric, target, before, score, [op for op in chosen if op not in raised], len(ops),
                                evaluate.count, _with_float_ops(base_cfg, chosen, raised), chosen_q,
                                sensitivity=sensitivity, raised=[op for op in chosen if op in raised])
        if measure_speed:
            result.speed_cost = evaluate.seconds(chosen_q) / evaluate.seconds(quantizer)
    result.evaluations = evaluate.count
    logger.info("fallback: %s", result.summary())
    return result
