"""Quantizer: the coreai_opt-style driver (prepare -> calibration_mode -> finalize) for ONNX models.

``Quantizer(model, config)`` annotates once (the plan is fixed for its lifetime), computes weight
qparams with their calculators at ``prepare``, streams activation statistics through onnxruntime
inside ``calibration_mode()``, and runs the fake-quantized QDQ model in onnxruntime outside it.
``finalize(backend)`` returns the QDQ model legalized for a backend.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from qdq.backends import ExportBackend, check_capabilities
from qdq.calibration.base import QParamsCalculatorBase
from qdq.calibration.channel_mean import ChannelMean
from qdq.calibration.pinned import PinnedCalculator, PinnedQParams
from qdq.calibration.runner import CalibrationRunner
from qdq.config import QuantizerConfig
from qdq.errors import ConfigError, DataError, ModelError
from qdq.graph.opset import BASE_OPSET, model_opset, required_opset, upgrade_model
from qdq.model_check import check_graph
from qdq.model_inputs import model_inputs
from qdq.model_io import load_model
from qdq.passes.annotate import annotate
from qdq.passes.bias_correction import BiasCorrectionPass, bias_correction_sites
from qdq.passes.insert_qdq import insert_qdq
from qdq.plan import QuantPlan, QuantTarget
from qdq.progress import progress_bar
from qdq.qparams import QParams
from qdq.session import make_session, run_batched

__all__ = ["PreparedModel", "Quantizer", "as_config", "finalize_model"]

logger = logging.getLogger(__name__)


def as_config(config: Any) -> QuantizerConfig:
    """A QuantizerConfig from a config object, a mapping, a YAML path or a preset name."""
    if config is None:
        return QuantizerConfig()
    if isinstance(config, QuantizerConfig):
        return config
    if isinstance(config, Mapping):
        return QuantizerConfig.from_dict(config)
    if isinstance(config, str):
        from qdq.presets import PRESETS, preset

        if config in PRESETS:
            return preset(config)
        return QuantizerConfig.from_yaml(config)
    if type(config).__name__ == "QuantizerConfig":  # a coreai_opt config object
        return QuantizerConfig(global_config=config.global_config,
                               op_type_configs=getattr(config, "module_type_configs", None),
                               op_name_configs=getattr(config, "module_name_configs", None))
    raise ConfigError(f"expected a QuantizerConfig, mapping, YAML path or preset name, got {type(config).__name__}")


def _check_float_model(model: ir.Model) -> None:
    graph = model.graph
    if not graph.inputs:
        raise ModelError("the model has no inputs; export it with example inputs (qdq export)")
    for node in graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx"):
            raise ModelError(
                f"the model is already quantized (node '{node.name}' is a {node.op_type}); pass the float "
                "model, or legalize an already-quantized QDQ model with qdq.finalize_model(model, backend)"
            )


def _upgraded_and_planned(model: ir.Model, config: QuantizerConfig) -> tuple[ir.Model, QuantPlan]:
    """A copy of the float model at the lowest opset the plan needs (>= 13; onnx's version converter), every
    node named, and its plan.

    The upgrade happens before annotation and calibration, so every later step sees one graph.
    """
    upgraded = upgrade_model(model, BASE_OPSET)
    if upgraded is model:
        upgraded = model.clone()  # never modify the caller's model
    NameFixPass()(upgraded)  # the plan names nodes: each needs a unique name
    plan = annotate(upgraded, config)
    if _freeze_quantized_defaults(upgraded, plan):
        plan = annotate(upgraded, config)
    targets = plan.targets.values()
    need = max(required_opset(t.spec for t in targets),
               21 if any(t.layout.block_size is not None for t in targets) else BASE_OPSET)
    if (model_opset(upgraded) or 0) < need:
        upgraded = upgrade_model(upgraded, need)
        plan = annotate(upgraded, config)
    return upgraded, plan


_BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def _freeze_quantized_defaults(model: ir.Model, plan: QuantPlan) -> bool:
    """Graph inputs with a default value (an initializer of the same name, as IR < 4 exports list every weight) that
    the plan quantizes, or that a quantized op reads (a bias), become plain constants: a value fed at run time would
    bypass the quantized copy. Whether any did."""
    graph = model.graph
    weights = {t.tensor for t in plan.targets.values() if t.kind != "activation"}
    ops = {op for t in plan.targets.values() if t.kind == "weight" for op in t.ops}

    def bias_of_quantized_op(v: ir.Value) -> bool:  # corrected and quantized with its weight
        return bool(v.uses()) and all(u.node.name in ops and u.idx == 2 and u.node.op_type in _BIAS_OPS
                                      for u in v.uses())

    frozen = [v for v in graph.inputs if v.name in graph.initializers
              and (v.name in weights or bias_of_quantized_op(v))]
    if not frozen:
        return False
    for v in frozen:
        graph.inputs.remove(v)
    logger.warning("input(s) %s have default values (initializers) that are quantized as weights: the quantized "
                   "model no longer takes them as inputs", ", ".join(v.name or "" for v in frozen))
    return True


class Quantizer:
    """Quantize an ONNX model (path, ``onnx.ModelProto`` or ``onnx_ir.Model``) per ``config``.

    The input model is never modified. Typical use::

        q = Quantizer("model.onnx", QuantizerConfig())
        prepared = q.prepare(example)
        with q.calibration_mode():
            for batch in batches:
                prepared(batch)
        final = q.finalize(backend=ExportBackend.ONNXRuntime)
    """

    def __init__(self, model: Any, config: Any = None) -> None:
        base = load_model(model)
        check_graph(base)
        _check_float_model(base)
        self.config = as_config(config)
        self.float_model, self.plan = _upgraded_and_planned(base, self.config)
        self.input_names = [v.name or "" for v in self.float_model.graph.inputs]
        self.output_names = [v.name or "" for v in self.float_model.graph.outputs]
        self._calculators: dict[str, QParamsCalculatorBase] = {}
        self._input_ranges: dict[str, tuple[float, float]] = {}  #: float model inputs: min, max over calibration
        self._means: dict[str, ChannelMean] = {}
        self._bias_sites = bias_correction_sites(self.float_model, self.plan) if self.config.bias_correction else {}
        self._qparams: dict[str, QParams] = {}
        self._seeded_only = False
        self._runner: CalibrationRunner | None = None
        self._calibrating = False
        self._qdq_cache: ir.Model | None = None
        self._session: Any = None
        self._example_feeds: dict[str, np.ndarray] | None = None  # a slice of the first batch, to trace with
        self.prepared: PreparedModel | None = None
        self.algorithm_notes: list[str] = []
        self._pending_algorithms, self._pending_calibrated = _split_by_stage(self.config.algorithms)
        self._pinned: dict[str, PinnedQParams] = {}  # weight qparams set by algorithms (GPTQ)
        self._rounded: dict[str, dict[str, Any]] = {}  # weight -> its (and its bias's) values before rounding
        # initializer -> its value before the after-calibration algorithms (sequential_bias_correction) moved it
        self._before_calibrated: dict[str, np.ndarray] = {}
        self.progress = True  # progress bars of algorithms (qdq.quantize / the CLI pass --quiet through)
        self.missing_statistics: list[str] = []  # replan(): activation targets with no calibration yet
        logger.info("plan: %s", self.plan.summary())

    # ------------------------------------------------------------------ algorithms
    @property
    def pending_algorithms(self) -> list[str]:
        """Names of the config's algorithms not applied yet (:meth:`apply_algorithms` runs them)."""
        return [a["name"] for a in [*self._pending_algorithms, *self._pending_calibrated]]

    def relevant_algorithms(self) -> list[str]:
        """Names of the pending algorithms that would change this model."""
        return self._relevant([*self._pending_algorithms, *self._pending_calibrated])

    def _relevant(self, specs: list[Any]) -> list[str]:
        from qdq.algorithms import build_algorithm

        return [a["name"] for a in specs if build_algorithm(a).applies_to(self.float_model)]

    @property
    def calibrated_corrections(self) -> bool:
        """True when after-calibration algorithms (``sequential_bias_correction``) changed this model's biases."""
        return bool(self._before_calibrated)

    @property
    def pending_calibrated_algorithms(self) -> list[str]:
        """Names of the config's after-calibration algorithms not applied yet (:meth:`apply_calibrated_algorithms`)."""
        return [a["name"] for a in self._pending_calibrated]

    def _skip_unapplied_algorithms(self) -> None:
        """prepare() without apply_algorithms(): the algorithms are skipped, with one warning naming those that would
        have changed this model (SmoothQuant on a CNN changes nothing: no warning)."""
        relevant = self._relevant(self._pending_algorithms)
        if relevant:
            logger.warning("algorithm(s) %s skipped: they need calibration data; call "
                           "quantizer.apply_algorithms(calibration_batches) before prepare() (qdq.quantize and the "
                           "CLI do)", relevant)
            self.algorithm_notes.append(f"skipped without calibration data: {relevant}")
        self._pending_algorithms = []

    def apply_algorithms(self, batches: Any) -> list[str]:
        """Run the config's algorithms on the float model with ``batches`` (calibration data: a list of
        batches, or a callable returning a fresh iterator of them), then re-plan. Call before :meth:`prepare`;
        :func:`qdq.quantize` and the CLI do. Returns the algorithms' notes."""
        from qdq.algorithms import AlgorithmContext, build_algorithm

        if self.prepared is not None:
            raise ConfigError("apply_algorithms() edits the float model: call it before prepare()")
        if not self._pending_algorithms:
            return []
        feeds = self._feed_stream(batches)
        algorithms = [build_algorithm(spec) for spec in self._pending_algorithms]
        self._pending_algorithms = []
        active = [a for a in algorithms if a.applies_to(self.float_model)]
        if not active:  # e.g. SmoothQuant on a CNN: nothing to edit, no re-planning
            return []
        model = self.float_model.clone()
        notes: list[str] = []
        plan = self.plan
        for i, algorithm in enumerate(active):
            if i:  # the previous algorithm edited the model: plan what it made
                plan = annotate(model, self.config)
            context = AlgorithmContext(plan=plan, pinned=self._pinned, progress=self.progress, rounded=self._rounded)
            notes += algorithm.apply(model, feeds, context)
        self.float_model, self.plan = _upgraded_and_planned(model, self.config)
        self._bias_sites = bias_correction_sites(self.float_model, self.plan) if self.config.bias_correction else {}
        self._qdq_cache = self._session = None
        self.algorithm_notes += notes
        logger.info("re-planned after %s: %s", ", ".join(n.split(":")[0] for n in notes), self.plan.summary())
        return notes

    def reference_model(self) -> ir.Model:
        """The float model as it computed before rounding algorithms (GPTQ, AdaRound) and bias corrections moved
        weights and biases (a new model; equivalent rewrites such as CLE or SmoothQuant stay): what the quantized
        model should reproduce."""
        reference = self.float_model.clone()
        _restore(reference, self._rounded.values())
        return reference

    def _feed_stream(self, batches: Any) -> Any:
        """A callable returning a fresh iterator of feeds dicts from ``batches`` (a list of batches, a one-shot
        iterator, read once into a list as each algorithm streams the data again, or such a callable)."""
        from qdq.model_inputs import model_inputs

        if not callable(batches):
            data = list(batches) if iter(batches) is batches else batches
            batches = lambda: iter(data)
        inputs = model_inputs(self.float_model)

        def feeds() -> Any:  # checked and in the model's dtypes (float16 inputs get float16 arrays)
            for i, batch in enumerate(batches()):
                yield inputs.feeds(batch, f"calibration batch {i}")
        return feeds

    def apply_calibrated_algorithms(self, batches: Any) -> list[str]:
        """Run the config's after-calibration algorithms (``sequential_bias_correction``) with ``batches`` (a list of
        batches, or a callable returning a fresh iterator of them). Call after calibration, before :meth:`finalize`;
        :func:`qdq.quantize` and the CLI do. They edit the float model's biases; the plan and the calibrated ranges
        stay. Returns the algorithms' notes."""
        from qdq.algorithms import AlgorithmContext, build_algorithm

        if not self._pending_calibrated:
            return []
        self._require_prepared()
        quantized = self.qdq_model()  # every activation range is calibrated (one DataError line if not)
        feeds = self._feed_stream(batches)
        reference = self.reference_model()
        algorithms = [build_algorithm(spec) for spec in self._pending_calibrated]
        self._pending_calibrated = []
        notes: list[str] = []
        vectors = {name: v.const_value.numpy().copy() for name, v in self.float_model.graph.initializers.items()
                   if v.const_value is not None and len(v.const_value.shape) <= 1}  # biases: what they move
        for i, algorithm in enumerate(algorithms):
            if i:  # the previous algorithm moved the float model's biases
                self._qdq_cache = self._session = None
                quantized = self.qdq_model()
            context = AlgorithmContext(plan=self.plan, pinned=self._pinned, progress=self.progress,
                                       rounded=self._rounded, quantized=quantized, reference=reference)
            notes += algorithm.apply(self.float_model, feeds, context)
        initializers = self.float_model.graph.initializers
        for name, before in vectors.items():
            now = initializers.get(name)
            if now is not None and now.const_value is not None and not np.array_equal(now.const_value.numpy(), before):
                self._before_calibrated.setdefault(name, before)
        self._qdq_cache = self._session = None
        self.algorithm_notes += notes
        return notes

    # ------------------------------------------------------------------ info
    @property
    def targets(self) -> dict[str, QuantTarget]:
        """Every planned QDQ pair, keyed by target key."""
        return self.plan.targets

    @property
    def qparams(self) -> dict[str, QParams]:
        """Current scale/zero-point of every target (shared targets resolve to their root's)."""
        self._refresh_qparams()
        return {k: self._qparams[self.plan.root(k)] for k in self.plan.targets if self.plan.root(k) in self._qparams}

    @property
    def observes_activations(self) -> bool:
        """True when some activation range must be calibrated (calibration data is required)."""
        return any(t.observed for t in self.plan.targets.values())

    @property
    def needs_data(self) -> bool:
        """True when calibration data is used: activation ranges, or bias correction's channel means
        (weight-only configs with ``bias_correction``)."""
        return self.observes_activations or bool(self._bias_sites)

    def skip_bias_correction(self, reason: str) -> None:
        """Turn bias correction off for this run (e.g. no calibration data), with one warning saying why."""
        if self._bias_sites:
            logger.warning("bias correction skipped: %s", reason)
        self._bias_sites = {}
        self._means = {}
        self._runner = None

    # ------------------------------------------------------------------ prepare / calibrate
    def prepare(self, example_inputs: Any = None) -> PreparedModel:
        """Quantize the weights and, with ``example_inputs``, seed every activation range.

        Seeded ranges make the prepared model runnable at once; the first calibration batch
        discards them, so calibration results do not depend on the example.
        """
        if self._pending_algorithms:
            self._skip_unapplied_algorithms()
        for key, t in self.plan.targets.items():
            if t.shared_with is None:
                self._calculators[key] = self._new_calculator(t)
        self._runner = None
        if example_inputs is not None:
            self._observe(example_inputs)
            self._seeded_only = True
        self._qdq_cache = None
        self.prepared = PreparedModel(self)
        return self.prepared

    def _new_calculator(self, t: QuantTarget) -> QParamsCalculatorBase:
        """A target's calculator; weights and constants have already observed their tensor."""
        pinned = self._pinned.get(t.tensor) if t.kind == "weight" else None
        if pinned is not None and pinned.applies(t.spec, t.layout):
            return PinnedCalculator(pinned)  # an algorithm chose this weight's grid
        calc = QParamsCalculatorBase.create(t.spec, t.layout, is_weight=t.kind == "weight")
        if t.kind != "activation":
            value = self.float_model.graph.initializers.get(t.tensor)
            tensor = value.const_value if value is not None and value.const_value is not None \
                else self._constant(t.tensor)
            calc.observe(np.asarray(tensor.numpy(), np.float32))
        return calc

    def replan(self, config: Any, *, calibrated_algorithms: bool = True) -> Quantizer:
        """A quantizer for ``config`` on this one's float model (its algorithms already applied) that reuses the
        statistics collected here: an activation target keeps the calibrated statistics of the same tensor (same
        layout and calculator; its qparams are recomputed for the new spec), bias correction its channel means;
        weights get their grid from the weight (or the grid an algorithm pinned). Nothing is recalibrated, this quantizer is not changed.
        :attr:`missing_statistics` lists activation targets new to ``config`` (they need calibration).
        ``calibrated_algorithms=False``: without what the after-calibration algorithms changed (biases
        ``sequential_bias_correction`` moved for this config's quantized model, wrong for another one)."""
        import copy

        self._require_prepared()
        new = Quantizer(self.float_model, config)  # its own copy of the model: restoring below is safe
        if not calibrated_algorithms:
            _restore(new.float_model, [self._before_calibrated])
        else:
            new._before_calibrated = dict(self._before_calibrated)
        weights = {t.tensor for t in new.plan.targets.values() if t.kind == "weight"}
        new._rounded = {w: originals for w, originals in self._rounded.items() if w in weights}
        # a layer left float: weight and bias as before rounding
        _restore(new.float_model, (o for w, o in self._rounded.items() if w not in weights))
        new._pending_algorithms = []  # the float model already carries this quantizer's algorithms
        new._pending_calibrated = []
        new._pinned = dict(self._pinned)
        new.progress = self.progress
        new._example_feeds = self._example_feeds
        new.algorithm_notes = list(self.algorithm_notes)
        missing: list[str] = []
        # tensor -> calibrated activation targets that cover it: its own, or (a pass-through output such as a
        # MaxPool's, which shared its input's qparams) the root whose statistics it shared
        observed: dict[str, list[QuantTarget]] = {}
        for key, old in self.plan.targets.items():
            if old.kind != "activation":
                continue
            root = self.plan.targets[self.plan.root(key)]
            calc = self._calculators.get(root.key)
            if root.observed and calc is not None and calc.has_data:
                observed.setdefault(old.tensor, []).append(root)
        for key, t in new.plan.targets.items():
            if t.shared_with is not None:
                continue
            if t.kind != "activation":
                new._calculators[key] = new._new_calculator(t)  # weights: the grid comes from the weight
                continue
            # the same tensor observed by the same calculator in the same layout: its statistics hold for any
            # spec (a consumer's symmetric grid where the producer's asymmetric one was)
            same = [o for o in observed.get(t.tensor, []) if o.layout == t.layout
                    and (o.spec.qparam_calculator_cls, o.spec.calculator_kwargs)
                    == (t.spec.qparam_calculator_cls, t.spec.calculator_kwargs)]
            if not same:
                missing.append(key)
                new._calculators[key] = self._new_calculator(t)
                continue
            best = next((o for o in same if o.spec == t.spec), same[0])
            calc = copy.deepcopy(self._calculators[best.key])
            calc.spec = t.spec
            new._calculators[key] = calc
        new._means = {k: copy.deepcopy(m) for k, m in self._means.items()} if new.config.bias_correction else {}
        if not self.config.bias_correction:
            new._bias_sites = {}  # no channel means were collected
        new.missing_statistics = missing
        new.prepared = PreparedModel(new)
        return new

    def _constant(self, name: str) -> ir.TensorProtocol:
        for node in self.float_model.graph:
            for out in node.outputs:
                if out.name == name and out.const_value is not None:
                    return out.const_value
        raise ModelError(f"constant '{name}' has no value")

    def _require_prepared(self) -> None:
        if not self._calculators and self.plan.targets:
            raise ModelError("call quantizer.prepare(example_inputs) first")

    def _activation_calculators(self) -> dict[str, list[Any]]:
        by_tensor: dict[str, list[Any]] = {}
        for key, t in self.plan.targets.items():
            if t.observed:
                by_tensor.setdefault(t.tensor, []).append(self._calculators[key])
        if self.config.bias_correction:
            if not self._means:
                for _, tensor, axis in self._bias_sites.values():
                    self._means.setdefault(tensor, ChannelMean(axis))
            for tensor, mean in self._means.items():
                by_tensor.setdefault(tensor, []).append(mean)
        return by_tensor

    def _observe(self, batch: Any, *, outputs: bool = False) -> list[np.ndarray]:
        """Feed one calibration batch (checked against the model inputs before any session is built)."""
        inputs = model_inputs(self.float_model)
        feeds = inputs.feeds(batch, "calibration batch")
        for name, x in feeds.items():  # a blank (constant) input is worth a warning after calibration
            if x.size and x.dtype.kind == "f":
                lo, hi = self._input_ranges.get(name, (np.inf, -np.inf))
                self._input_ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
        if self._example_feeds is None:
            self._example_feeds = _example_slice(self.float_model, feeds)
        if self._runner is None:
            self._runner = CalibrationRunner(self.float_model, self._activation_calculators(), outputs=True,
                                             inputs=inputs)
        outs = self._runner.observe(feeds, outputs=outputs)
        self._qdq_cache = None
        self._session = None
        return outs

    @contextlib.contextmanager
    def calibration_mode(self) -> Iterator[Quantizer]:
        """Within the block, the prepared model runs in float and feeds the activation calculators."""
        self._require_prepared()
        if self._seeded_only:
            self._reset_activation_calculators()
        self._calibrating = True
        try:
            yield self
        finally:
            self._calibrating = False

    def _reset_activation_calculators(self) -> None:
        for key, t in self.plan.targets.items():
            if t.observed:
                self._calculators[key] = QParamsCalculatorBase.create(t.spec, t.layout, is_weight=False)
        self._runner = None
        self._means = {}
        self._seeded_only = False

    def calibrate(self, batches: Iterable[Any], *, total: int | None = None, progress: bool = True) -> int:
        """Run every batch through calibration; returns the number of batches seen."""
        if not self._calculators:
            self.prepare()
        n = 0
        self._input_ranges.clear()
        with self.calibration_mode():
            for batch in progress_bar(batches, total=total, desc="calibrating", disable=not progress, unit="batch"):
                self._observe(batch)
                n += 1
        if n == 0:
            raise DataError("calibration data is empty: pass at least one batch")
        for name, (lo, hi) in self._input_ranges.items():
            if lo == hi:
                logger.warning("calibration input '%s' holds one value (%g) in every sample: activation ranges will "
                               "not fit real inputs; check the data (blank arrays, wrong file)", name, lo)
        return n

    def _refresh_qparams(self) -> None:
        for key, calc in self._calculators.items():
            if calc.has_data:
                self._qparams[key] = calc.qparams()

    # ------------------------------------------------------------------ models
    def qdq_model(self) -> ir.Model:
        """The float model with every QDQ pair inserted, at the current qparams (a new model)."""
        self._require_prepared()
        if self._qdq_cache is None:
            self._refresh_qparams()
            missing = [k for k, t in self.plan.targets.items() if t.shared_with is None and k not in self._qparams]
            if missing:
                raise DataError(
                    f"{len(missing)} activation ranges are not calibrated (e.g. '{missing[0]}'): pass example "
                    "inputs to prepare() or run batches inside calibration_mode()"
                )
            model = self.float_model.clone()
            insert_qdq(model, self.plan, self._qparams)
            if self._bias_sites:
                means = {k: m.mean for k, m in self._means.items() if m.mean is not None}
                if means:
                    BiasCorrectionPass(self.plan, self._qparams, means, self._bias_sites)(model)
                else:
                    logger.warning("bias_correction is on but no calibration batch was seen; biases unchanged")
            self._qdq_cache = model
        return self._qdq_cache.clone()

    def run(self, batch: Any) -> list[np.ndarray]:
        """Run the fake-quantized model in onnxruntime: float compute on dequantized values, no graph rewrites."""
        inputs = model_inputs(self.float_model)
        feeds = inputs.feeds(batch)
        if self._session is None:
            self._session = make_session(self.qdq_model(), level="none")  # exact reference semantics: no QDQ rewrites
        return run_batched(self._session, feeds, inputs)

    def finalize(self, backend: Any = ExportBackend.ONNXRuntime, *, example_inputs: Any = None,
                 **backend_options: Any) -> Any:
        """The QDQ model finalized for ``backend``; save the result with ``qdq.save``.

        onnxruntime: a new ``onnx_ir.Model`` (real int8 kernels; ``kernel_format="u8s8"|"u8u8"|"auto"``, see
        :func:`finalize_model`). Core ML / Core AI: a
        :class:`~qdq.backends.artifact.BackendArtifact` carrying the ``torch.export`` program, converted by
        coremltools / coreai-torch on ``save("m.mlpackage")`` / ``save("m.aimodel")``. ``backend_options``:
        ``deployment_target`` (Core ML ``"iOS17"`` / ``"iOS18"``), ``compute_precision``, ``input_names``,
        ``output_names``, ``dynamic_batch``. ``example_inputs`` trace the program (default: a slice of the
        first calibration batch, else the graph's input shapes).
        """
        if self._pending_calibrated:
            logger.warning("algorithm(s) %s skipped: call quantizer.apply_calibrated_algorithms(calibration_batches) "
                           "after calibration, before finalize() (qdq.quantize and the CLI do)",
                           self.pending_calibrated_algorithms)
            self.algorithm_notes.append(f"skipped, not applied after calibration: {self.pending_calibrated_algorithms}")
            self._pending_calibrated = []
        if example_inputs is None and self._example_feeds is not None:
            feeds = self._example_feeds
            if all(name in feeds for name in self.input_names):
                example_inputs = [feeds[name] for name in self.input_names]
        return finalize_model(self.qdq_model(), backend, example_inputs=example_inputs, **backend_options)


def _restore(model: ir.Model, groups: Iterable[Mapping[str, np.ndarray]]) -> None:
    """Give ``model``'s initializers named in ``groups`` (name -> value before an algorithm moved it) those values."""
    initializers = model.graph.initializers
    for originals in groups:
        for name, value in originals.items():
            if (init := initializers.get(name)) is not None:
                init.const_value = ir.tensor(value, name=name)


def _split_by_stage(specs: Any) -> tuple[list[Any], list[Any]]:
    """The config's algorithms that run before calibration, and those that run after it (in config order)."""
    from qdq.algorithms import build_algorithm

    before: list[Any] = []
    after: list[Any] = []
    for spec in specs:
        (after if build_algorithm(spec).stage == "calibrated" else before).append(spec)
    return before, after


def _example_slice(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first two samples of a batch (of inputs whose batch dimension is symbolic; others whole)."""
    out = {}
    for v in model.graph.inputs:
        x = feeds.get(v.name or "")
        if x is None:
            continue
        dynamic = v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int)
        out[v.name or ""] = np.array(x[:2]) if dynamic and x.ndim else np.array(x)
    return out


def finalize_model(model: Any, backend: Any = ExportBackend.ONNXRuntime, *, example_inputs: Any = None,
                   options: Any = None, kernel_format: str | None = None, **backend_options: Any) -> Any:
    """Finalize any prepared QDQ model (qdq's own, or exported by the torch mirror) for ``backend``.

    onnxruntime: a new, legalized ``onnx_ir.Model``; ``kernel_format`` ``"u8s8"`` / ``"u8u8"`` / ``"auto"``
    (default: u8u8, uint8 weights, on an x86 CPU without VNNI/AMX, where onnxruntime's U8S8 kernels saturate;
    see :mod:`qdq.backends.host_cpu`). Core ML / Core AI: a :class:`~qdq.backends.artifact.BackendArtifact`
    (see :meth:`Quantizer.finalize` for the options). The input is not modified.
    """
    from qdq.backends.artifact import backend_options as make_options
    from qdq.backends.artifact import finalize_for_backend, is_torch_backend
    from qdq.backends.host_cpu import kernel_format_for
    from qdq.backends.pipelines import run_finalize

    backend = ExportBackend.parse(backend)
    kernel_format_for(backend, kernel_format)  # a bad name, or one asked of Core ML / Core AI: one line
    if is_torch_backend(backend):
        opts = make_options(options, **backend_options)
        return finalize_for_backend(model, backend, opts, example_inputs=example_inputs)
    if backend_options or options is not None:
        raise ConfigError(f"{', '.join(sorted(backend_options)) or 'options'}: options of the Core ML / Core AI "
                          f"backends, not of {backend.value}")
    base = load_model(model)
    model = base.clone()
    check_capabilities(model, backend)
    run_finalize(model, backend, kernel_format)  # the backend's passes, through onnx_ir's PassManager
    return model


class PreparedModel:
    """Callable returned by :meth:`Quantizer.prepare`: float + observers inside ``calibration_mode()``,
    fake-quantized onnxruntime run outside it. Returns one array for single-output models."""

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer

    def __call__(self, *inputs: Any, **named: Any) -> Any:
        q = self.quantizer
        batch: Any = named if named else (inputs[0] if len(inputs) == 1 else inputs)
        outs = q._observe(batch, outputs=True) if q._calibrating else q.run(batch)
        return outs[0] if len(outs) == 1 else outs

    @property
    def model(self) -> ir.Model:
        """The prepared QDQ graph at the current qparams."""
        return self.quantizer.qdq_model()
