"""Sequential bias correction: make each quantized layer's per-channel output mean match the float model's.

Runs after calibration, on the fake-quantized model (weights rounded, activation ranges calibrated). Layer by
layer in graph order, for every Conv / Gemm / MatMul+Add whose weight is quantized and whose bias is a
constant, it measures the mean output difference ``E[y_q - y_f]`` per output channel on calibration samples,
with every layer before it already corrected, and subtracts it from the float bias. That removes the
systematic part of the error the layer sees and adds: its own weight rounding, the clipping and rounding of
its quantized input and the mean shift noise picks up through the ReLU/ReLU6 clamps upstream (the empirical
bias correction of AIMET and of Nagel et al. 2019, measured on the quantized model rather than predicted from
float input means, as ``bias_correction: true`` does).

What is matched is the mean the next layer sees: for a layer whose float output goes through a Relu or Clip,
the mean after that clamp, and the shift is divided by the share of elements the float clamp passes (a bias
shift moves only those). One float pass measures every layer; then each layer runs the quantized model
truncated to its output and finalized for onnxruntime (its integer kernels), so the cost is about one calibration pass per layer
on ``samples`` samples, and memory is one batch of one tensor (the float pass: ``fetch_samples`` samples of
every corrected output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qdq.algorithms import Algorithm, AlgorithmContext, register_algorithm
from qdq.errors import ConfigError, DataError
from qdq.graph.readers import sole_reader
from qdq.passes.fold_activation_clip import activation_bounds
from qdq.plan import ALL_USES
from qdq.progress import progress_bar

__all__ = ["SequentialBiasCorrection", "correction_sites"]

logger = logging.getLogger(__name__)

_BIAS_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _bias_of(node: ir.Node) -> tuple[ir.Value, ir.Value, int] | None:
    """(bias initializer, the tensor it is added into, channel axis) of a Conv / Gemm / MatMul+Add, or None."""
    if node.op_type == "Conv":
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        return node.inputs[2], node.outputs[0], 1
    if node.op_type == "Gemm":
        attrs = node.attributes
        trans_a: int = attrs.get_int("transA", 0)
        if (len(node.inputs) < 3 or node.inputs[2] is None or trans_a
                or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0):
            return None
        return node.inputs[2], node.outputs[0], -1
    if node.op_type == "MatMul":
        add = sole_reader(node.outputs[0])
        if add is None or add.op_type != "Add":
            return None
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        if other is None:
            return None
        return other, add.outputs[0], -1
    return None


def correction_sites(model: ir.Model, weights: set[str]) -> list[tuple[ir.Node, ir.Value, ir.Value, int]]:
    """(layer, bias, output, channel axis) in graph order, for layers whose weight (input 1) is in ``weights`` and
    whose bias is a constant float vector read by nothing else, one value per output channel."""
    sites = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        if node.inputs[1].name not in weights:
            continue
        found = _bias_of(node)
        if found is None:
            continue
        bias, out, axis = found
        value = bias.const_value
        if (value is None or value.dtype not in _BIAS_DTYPES or len(value.shape) != 1 or len(bias.uses()) != 1
                or bias.is_graph_input() or not out.name):
            continue
        sites.append((node, bias, out, axis))
    return sites


def _lower(value: ir.Value, shift: np.ndarray) -> None:
    """Subtract ``shift`` from the constant ``value`` (in float64, stored in its own dtype)."""
    data = value.const_value.numpy()  # type: ignore[union-attr]
    value.const_value = ir.tensor((data.astype(np.float64) - shift).astype(data.dtype), name=value.name)


def _truncated(model: ir.Model, name: str) -> ir.Model:
    """A copy of ``model`` whose only output is tensor ``name``, without the nodes it does not need."""
    cut = model.clone()
    value = next((v for n in cut.graph for v in n.outputs if v.name == name), None)
    assert value is not None, name
    cut.graph.outputs.clear()
    cut.graph.outputs.append(value)
    RemoveUnusedNodesPass()(cut)
    return cut


def _passed_band(value: ir.Value) -> tuple[float, float] | None:
    """(lo, hi) of the Relu / Clip that is the only reader of ``value``, else None."""
    act = sole_reader(value)
    bounds = activation_bounds(act) if act is not None else None
    if bounds is None:
        return None
    lo, hi = bounds
    return (-np.inf if lo is None else lo), (np.inf if hi is None else hi)


@register_algorithm("sequential_bias_correction")
class SequentialBiasCorrection(Algorithm):
    """Options: ``samples`` (calibration samples measured; 0 = all of them, default 128), ``fetch_samples``
    (samples per run of the float pass, which fetches every corrected layer's output at once; default 4; the
    quantized passes fetch one tensor and run four times as many)."""

    stage: ClassVar[str] = "calibrated"
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {"samples": (int, 128), "fetch_samples": (int, 4)}

    def validate(self) -> None:
        if self.options["fetch_samples"] < 1:
            raise ConfigError(f"sequential_bias_correction fetch_samples must be >= 1, got "
                              f"{self.options['fetch_samples']}")
        if self.options["samples"] < 0:
            raise ConfigError(f"sequential_bias_correction samples must be >= 0 (0 = all), got "
                              f"{self.options['samples']}")

    def applies_to(self, model: ir.Model) -> bool:
        return any(_bias_of(n) is not None for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul"))

    def apply(self, model: ir.Model, batches: Callable[[], Iterable[Mapping[str, Any]]],
              context: AlgorithmContext | None = None) -> list[str]:
        if context is None or context.quantized is None or context.reference is None:
            raise ConfigError(f"{self.name} runs on the calibrated model: call Quantizer.apply_calibrated_algorithms "
                              "after calibration (qdq.quantize and the CLI do)")
        weights = {t.tensor for t in context.plan.by_kind("weight") if t.uses is ALL_USES or t.uses}
        sites = correction_sites(model, weights)
        if not sites:
            return [f"{self.name}: no quantized Conv/Gemm/MatMul+Add with a constant bias; nothing corrected"]
        reference, quantized = context.reference, context.quantized
        ref_values = {v.name: v for n in reference.graph for v in n.outputs}
        sites = [site for site in sites if site[2].name in ref_values]  # not renamed by an earlier algorithm
        bands = {out.name or "": _passed_band(ref_values[out.name]) for _, _, out, _ in sites}
        axes = {out.name or "": axis for _, _, out, axis in sites}
        float_means, passed, samples = self._float_statistics(reference, axes, bands, batches)
        biases = quantized.graph.initializers
        corrected, shifts = 0, []
        for node, bias, out, axis in progress_bar(sites, desc=self.name, unit="layer", disable=not context.progress):
            name = out.name or ""
            q_bias = biases.get(bias.name or "")
            if q_bias is None or q_bias.const_value is None:
                continue  # the bias was rewritten in the quantized graph
            q_mean = self._quantized_mean(quantized, name, axis, bands[name], batches)
            data = bias.const_value.numpy()  # type: ignore[union-attr]
            if q_mean is None or q_mean.shape != data.shape or float_means[name].shape != data.shape:
                continue  # a bias broadcast over another axis than the one measured
            # moving the bias by d moves the mean the next layer sees by d times the share the activation passes
            live = passed[name] >= _MIN_PASSED
            shift = np.where(live, (q_mean - float_means[name]) / np.maximum(passed[name], _MIN_PASSED), 0.0)
            key = node.inputs[1].name or ""  # type: ignore[union-attr]
            context.rounded.setdefault(key, {}).setdefault(bias.name or "", data)  # restored if left float
            for value in (bias, q_bias):  # the float model's, and the quantized copy the next layers run
                _lower(value, shift)
            shifts.append(float(np.abs(shift).mean()))
            corrected += 1
        note = (f"{self.name}: {corrected} biases corrected on {samples} samples, layer by layer; mean |shift| "
                f"{np.mean(shifts) if shifts else 0.0:.3g}")
        logger.info(note)
        return [note]

    def _feeds(self, batches: Callable[[], Iterable[Mapping[str, Any]]], inputs: Any) -> Iterable[dict[str, Any]]:
        """The first ``samples`` samples of ``batches()`` (all of them for 0), checked and cast to the model's
        input dtypes (a float16 model gets float16)."""
        from qdq.model_inputs import first_samples

        return first_samples(batches(), inputs, self.options["samples"])

    def _float_statistics(self, reference: ir.Model, axes: dict[str, int], bands: dict[str, tuple[float, float] | None],
                          batches: Callable[[], Iterable[Mapping[str, Any]]],
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        """One pass of the float model: per output channel of every site, the mean of its activation's output
        and the share of elements the activation passes (1 without one); and the samples seen."""
        from qdq.model_inputs import model_inputs
        from qdq.session import iter_batched, make_session

        names = list(axes)
        session = make_session(reference, arena=False, extra_outputs=names, label=f"float model ({self.name})")
        inputs = model_inputs(reference)
        sums: dict[str, _ChannelSums] = {name: _ChannelSums(axes[name], bands[name]) for name in names}
        seen = 0
        step = self.options["fetch_samples"]
        for feeds in self._feeds(batches, inputs):
            for chunk, outs in iter_batched(session, feeds, inputs, names, step=step):
                for name, y in zip(names, outs, strict=True):
                    sums[name].add(y, name, self.name)
                seen += chunk.real
        if seen == 0:
            raise DataError(f"{self.name} needs calibration data: the batches are empty")
        return ({k: v.mean() for k, v in sums.items()}, {k: v.passed() for k, v in sums.items()}, seen)

    def _quantized_mean(self, quantized: ir.Model, name: str, axis: int, band: tuple[float, float] | None,
                        batches: Callable[[], Iterable[Mapping[str, Any]]]) -> np.ndarray | None:
        """Per-channel mean of the activation of tensor ``name`` in the quantized model truncated to it."""
        from qdq.model_inputs import model_inputs
        from qdq.quantizer import finalize_model
        from qdq.session import iter_batched, make_session

        # finalized for onnxruntime and optimized: its integer kernels, 5-8x faster than the fake-quant graph run
        # unoptimized. Not the prepared graph optimized: there onnxruntime 1.32 quantizes the float weight of a
        # Conv left float between a DequantizeLinear and a QuantizeLinear itself, per tensor, into a QLinearConv
        # (EfficientNet-Lite0 with its first depthwise conv float: 10 dB instead of 24); finalize keeps it float
        cut = finalize_model(_truncated(quantized, name))
        session = make_session(cut, arena=False, label=f"quantized model ({self.name})")
        inputs = model_inputs(cut)
        sums = _ChannelSums(axis, band)
        step = _Q_RUN * self.options["fetch_samples"]  # one tensor fetched
        for feeds in self._feeds(batches, inputs):
            for _, outs in iter_batched(session, feeds, inputs, step=step):
                sums.add(outs[0], name, self.name)
        return sums.mean() if sums.total is not None else None


_Q_RUN = 4  # the quantized pass fetches one tensor: it runs this many times fetch_samples at once
_MIN_PASSED = 0.01  # a channel its activation passes less often is left alone (a bias shift would be a guess)


class _ChannelSums:
    """Streaming per-channel sums of ``clip(y, band)`` and of the elements inside the band."""

    def __init__(self, axis: int, band: tuple[float, float] | None) -> None:
        self.axis, self.band = axis, band
        self.total: np.ndarray | None = None
        self.inside: np.ndarray | None = None
        self.count = 0

    def add(self, y: np.ndarray, name: str, who: str) -> None:
        if not np.all(np.isfinite(y)):
            raise DataError(f"{who}: tensor {name} has NaN/Inf on the calibration data")
        ax = self.axis % y.ndim
        others = tuple(i for i in range(y.ndim) if i != ax)
        if self.band is not None:
            lo, hi = self.band
            inside = ((y > lo) & (y < hi)).sum(axis=others)
            y = np.clip(y, lo, hi)
        else:
            inside = np.full(y.shape[ax], y.size // y.shape[ax])
        part = y.sum(axis=others, dtype=np.float64)  # float64 sums without a float64 copy of y
        self.total = part if self.total is None else self.total + part
        self.inside = inside if self.inside is None else self.inside + inside
        self.count += y.size // y.shape[ax]

    def mean(self) -> np.ndarray:
        assert self.total is not None
        return self.total / max(self.count, 1)

    def passed(self) -> np.ndarray:
        assert self.inside is not None
        return self.inside / max(self.count, 1)

