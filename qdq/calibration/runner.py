"""Run a float model in onnxruntime and stream chosen intermediate tensors to calculators.

One session of the float model serves every observed tensor. A calculator that only needs a
reduction of its tensor (min/max for the min/max calculators, per-channel sums for bias
correction: :meth:`~qdq.calibration.base.QParamsCalculatorBase.graph_reduction`) gets it from
ReduceMin/ReduceMax/ReduceSum nodes added to the graph (:mod:`qdq.calibration.reductions`):
onnxruntime's threads reduce the tensor, which is never copied out. Calculators that need the
tensor itself (histograms) get it as an extra graph output. No statistic assumes a layout:
observed tensors may have any rank and any leading dim. Each batch's results go straight to the
calculators and are dropped before the next batch: memory is bounded by one run, not by the
number of samples. Batches are fed as the model declares its inputs (:mod:`qdq.model_inputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qdq.calibration.base import RangeCalculatorBase
from qdq.calibration.reductions import GraphReductions, Reduction, fetch_names
from qdq.errors import DataError, ModelError
from qdq.model_inputs import Chunk, ModelInputs, is_float, iter_chunks, join_outputs, model_inputs
from qdq.session import OPT_LEVELS, make_session, run, session_options

__all__ = ["DEFAULT_CHUNK_BYTES", "OPT_LEVELS", "CalibrationRunner", "as_feeds", "make_session", "session_options"]

logger = logging.getLogger(__name__)


def as_feeds(batch: Any, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Normalise a batch (array, tuple/list in input order, or dict by name) to ORT feeds."""
    if isinstance(batch, Mapping):
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise DataError(f"batch is missing model inputs {missing}; it has {sorted(batch)}")
        items = [(n, batch[n]) for n in input_names]
    else:
        if not isinstance(batch, (tuple, list)):
            batch = (batch,)
        if len(batch) != len(input_names):
            raise DataError(f"model takes {len(input_names)} inputs ({', '.join(input_names)}), got {len(batch)}")
        items = list(zip(input_names, batch))
    feeds = {}
    for name, x in items:
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.dtype.kind == "f" and x.dtype != np.float32:
            x = x.astype(np.float32)
        feeds[name] = np.asarray(x, order="C")
    return feeds


#: Bytes of observed activations one onnxruntime run may produce; larger batches of a dynamic-batch
#: model run in micro-batches. Counts the tensors copied out (histograms) and the ones reduced in the
#: graph (their size drives onnxruntime's activation memory), measured on the first run.
#: EfficientNet-Lite0 (26.5 MiB of observed activations per sample, 2 threads) at 1 / 2 / 4 samples
#: per run: 2.5 / 2.5 / 2.4 s and 310 / 378 / 502 MB peak RSS for ``qdq quantize`` on 256 images.
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024


def _graph_reduction(calc: Any) -> tuple[str, int | None] | None:
    """What ``calc`` needs of its tensor if that is a reduction (see QParamsCalculatorBase.graph_reduction)."""
    fn = getattr(calc, "graph_reduction", None)
    if fn is not None:
        return fn()
    from qdq.calibration.channel_mean import ChannelMean

    if type(calc) is ChannelMean:  # adapter until ChannelMean implements graph_reduction itself
        return ("sum", calc.axis)
    return None


def _observe_reduced(calc: Any, values: tuple[np.ndarray, ...], count: int) -> None:
    fn = getattr(calc, "observe_reduced", None)
    if fn is not None:
        fn(values, count)
        return
    sums = values[0].astype(np.float64)  # ChannelMean adapter: the float64 running sums it keeps
    calc.total = sums if calc.total is None else calc.total + sums
    calc.count += count


def _infer_types(model: ir.Model) -> ir.Model:
    """``model`` with onnx shape inference's types and shapes (the model itself if inference fails)."""
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        return ShapeInferencePass(strict_mode=False).call(model).model
    except Exception as exc:  # noqa: BLE001  # an exotic op: unknown types only cost speed (copied out)
        logger.debug("shape inference failed (%s); untyped tensors are reduced on the host", exc)
        return model


def _bytes_per_sample(value: ir.Value) -> float | None:
    """Bytes per sample of a tensor whose shape has at most one dynamic dim (the one that scales with the
    batch, wherever it is), None when that is not known statically."""
    if value.shape is None or value.dtype is None:
        return None
    dims = list(value.shape)
    static = [d for d in dims if isinstance(d, int)]
    if len(dims) - len(static) > 1:
        return None
    return float(np.prod(static, dtype=np.float64)) * value.dtype.itemsize


def _count_sensitive(calc: Any) -> bool:
    """Whether duplicated samples would change ``calc`` (sums, histograms); min/max ranges are immune."""
    return not isinstance(calc, RangeCalculatorBase)


class CalibrationRunner:
    """Float-model session whose extra outputs feed ``calculators`` (tensor name -> calculators).

    Batches are checked and converted against the model's input signature (``inputs``, read from
    the model by default). Reductions run inside the session (:mod:`qdq.calibration.reductions`);
    their results are merged over the runs of a batch and every such calculator is fed once per
    batch. Tensors copied out (histograms) are fed run by run (``observe_chunk``) and each
    calculator closes the batch once, so the calculators always see the logical batch.

    Runs: a model with a static batch N runs in chunks of N (a short remainder padded with
    copies of real samples); a dynamic-batch model runs whole batches, or micro-batches sized to
    ``chunk_bytes`` when every copying calculator accepts a batch in pieces. Exactness:

    * min/max (every range calculator, moving_average included) and histograms and sums of runs
      without padding are exactly those of the whole batch: runs only split the samples;
    * padded runs (static N > 1, batch not a multiple of N): min/max are unaffected by the copies;
      sums and copied tensors drop the padded rows where the tensor's dim 0 is the model batch
      (NCHW, [B, S, D], ...). Tensors whose dim 0 is something else ([S, B, D], [B*H, S, D],
      scalars) cannot be cut: their histograms/sums include the copies and a warning says so
      (a batch size that is a multiple of N avoids it).

    Splitting a batch into runs assumes what batched inference always assumes: no op mixes
    samples (a reduction over the batch axis would see fewer samples per run).
    """

    def __init__(self, model: ir.Model, calculators: Mapping[str, Sequence[Any]], *, outputs: bool = False,
                 threads: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES, inputs: Any = None) -> None:
        self.calculators = {k: list(v) for k, v in calculators.items() if v}
        self.inputs: ModelInputs = model_inputs(inputs if inputs is not None else model)
        self.static_batch = self.inputs.static_batch
        clone = model.clone()  # shares the weights: no copy
        if any(v.dtype is None for node in clone.graph for v in node.outputs if v.name in self.calculators):
            clone = _infer_types(clone)  # untyped intermediate tensors could not be reduced in the graph
        graph = clone.graph
        self.output_names = [v.name or "" for v in graph.outputs] if outputs else []
        self.input_names = [v.name or "" for v in graph.inputs]
        values: dict[str, ir.Value] = {v.name or "": v for v in graph.inputs}
        for node in graph:
            for out in node.outputs:
                values[out.name or ""] = out
        opset = clone.opset_imports.get("", clone.opset_imports.get("ai.onnx", 13))
        builder = GraphReductions(graph, opset, set(values) | set(graph.initializers))

        self.reductions: list[Reduction] = []
        self.tensor_calculators: dict[str, list[Any]] = {}
        by_key: dict[tuple[str, str, int | None], Reduction] = {}
        for name, calcs in self.calculators.items():
            value = values.get(name)
            if value is None:
                value = graph.initializers.get(name)
                if value is None:
                    raise ModelError(f"observed tensor '{name}' is not produced by any node")
            for calc in calcs:
                planned = builder.plan(value, _graph_reduction(calc))
                if planned is None:
                    self.tensor_calculators.setdefault(name, []).append(calc)
                    continue
                key = (name, planned[0], planned[1])
                if key not in by_key:
                    by_key[key] = builder.add(value, *planned)
                    self.reductions.append(by_key[key])
                by_key[key].calculators.append(calc)
        self._builder = builder
        # Tensors copied out: extra graph outputs (graph inputs and initializers are read on the host).
        self._host: dict[str, np.ndarray] = {}
        for n in self.tensor_calculators:
            tensor = graph.initializers[n].const_value if n in graph.initializers else None
            if tensor is not None and n not in self.input_names:
                self._host[n] = np.asarray(tensor.numpy())
        present = {v.name for v in graph.outputs}
        copied = [n for n in self.tensor_calculators if n not in self.input_names and n not in self._host]
        for name in copied:
            if name not in present:
                graph.outputs.append(values[name])
        # Bytes a sample produces in the reduced tensors: from the static shape when only one dim is dynamic
        # (it scales with the samples), else from the tensor's Shape, fetched on the first run only.
        reduced = [r.tensor for r in self.reductions if r.tensor not in self.tensor_calculators]
        self._static_bytes = 0.0
        self._measure: dict[str, str] = {}
        for n in dict.fromkeys(reduced):
            if self.static_batch is not None or values[n].producer() is None:
                continue
            size = _bytes_per_sample(values[n])
            if size is None:
                self._measure[n] = builder.shape_output(values[n])
            else:
                self._static_bytes += size
        self._itemsize = {n: (dt.itemsize if (dt := values[n].dtype) is not None else 4) for n in self._measure}
        self._copied = copied
        self._stat_fetch = fetch_names(builder)
        self._shape_fetch = [r.shape_output for r in self.reductions if r.shape_output is not None]
        # The arena keeps peak RSS steady (without it glibc fragmentation made the peak vary 270-400 MB).
        self.session = make_session(clone, threads=threads)
        self.num_batches = 0
        self.num_runs = 0
        self.chunk_bytes = chunk_bytes
        self.chunkable = all(getattr(c, "supports_chunks", False) for cs in self.tensor_calculators.values() for c in cs)
        #: bytes one sample produces in the observed tensors (measured on the first run of a dynamic model)
        self.bytes_per_sample: float | None = None
        self._warned: set[str] = set()
        self._fetch: dict[tuple[tuple[str, ...], bool], list[str]] = {}
        self._sums = [(i, r) for i, r in enumerate(self.reductions) if r.kind == "sum"]
        self._reset_batch()
        logger.debug("calibration runner: %d in-graph reductions, %d tensors copied out, static batch %s",
                     len(self.reductions), len(copied), self.static_batch)

    def _reset_batch(self) -> None:
        self._packed: dict[str, np.ndarray] = {}
        self._counts = [0] * len(self.reductions)
        self._whole: dict[str, list[np.ndarray]] = {}

    def observe(self, batch: Any, *, outputs: bool = True) -> list[np.ndarray]:
        """Run one batch, update every calculator; returns the model outputs (if built with ``outputs``)."""
        feeds = self.inputs.feeds(batch, "calibration batch")
        for name, x in feeds.items():
            if is_float(x.dtype) and not np.isfinite(x).all():
                raise DataError(f"NaN/Inf in calibration input '{name}' (batch {self.num_batches}); clean the data")
        want = self.output_names if outputs else []
        n = self.inputs.batch_len(feeds)
        if n == 0:
            return [np.empty((0,))] * len(want)  # an empty batch: calculators see nothing
        parts: list[tuple[Chunk, list[np.ndarray]]] = []
        if self.static_batch is not None:
            for chunk in iter_chunks(feeds, self.inputs):
                parts.append((chunk, self._run(chunk, want)))
        elif not self.chunkable or n is None or n <= 1 or self.bytes_per_sample == 0:
            parts.append((Chunk(feeds, 0, n or 1, n or 1), self._run(Chunk(feeds, 0, n or 1, n or 1), want)))
        else:
            start = 0
            while start < n:  # the first run ever is 1 sample: it measures the bytes per sample
                step = 1 if self.bytes_per_sample is None else self._step()
                chunk = Chunk(self.inputs.split(feeds, start, start + step), start, min(step, n - start), min(step, n - start))
                parts.append((chunk, self._run(chunk, want)))
                start += step
        self._end_batch()
        self.num_batches += 1
        return join_outputs(want, parts)

    def _step(self) -> int:
        return max(1, int(self.chunk_bytes // max(self.bytes_per_sample or 1.0, 1.0)))

    def _run(self, chunk: Chunk, want: Sequence[str]) -> list[np.ndarray]:
        measure = self.bytes_per_sample is None and self.static_batch is None
        key = (tuple(want), measure)
        fetch = self._fetch.get(key)
        if fetch is None:
            fetch = self._fetch[key] = list(dict.fromkeys([*want, *self._copied, *self._stat_fetch,
                                                           *self._shape_fetch, *(self._measure.values() if measure
                                                                                 else ())]))
        outs = dict(zip(fetch, run(self.session, fetch, chunk.feeds, start=chunk.start,
                                   where=f"calibration batch {self.num_batches}"))) if fetch else {}
        self.num_runs += 1
        if measure:
            size: float = sum(outs[n].nbytes for n in self._copied)
            size += sum(int(np.prod(outs[s])) * self._itemsize[n] for n, s in self._measure.items())
            self.bytes_per_sample = size / max(chunk.padded, 1) + self._static_bytes
        drop = (chunk.padded, chunk.real) if chunk.padded != chunk.real else None
        uncut = self._builder.finish(outs, self._packed, drop=drop)
        for i, red in self._sums:
            shape = outs[red.shape_output] if red.shape_output is not None else None
            self._counts[i] += red.count(self._builder.rows_counted(red, outs, drop), shape)
        for name in uncut:
            self._warn_uncut(name, chunk)
        for name, calcs in self.tensor_calculators.items():
            x = outs.get(name)
            if x is None:
                x = self._host[name] if name in self._host else chunk.feeds[name]
            if drop is not None:
                if x.ndim and x.shape[0] == chunk.padded:
                    x = x[:chunk.real]
                elif any(_count_sensitive(c) for c in calcs):
                    self._warn_uncut(name, chunk)
            for calc in calcs:
                if getattr(calc, "supports_chunks", False):
                    try:
                        calc.observe_chunk(x)
                    except DataError as exc:
                        raise DataError(f"tensor '{name}': {exc}") from exc
            if not all(getattr(c, "supports_chunks", False) for c in calcs):
                self._whole.setdefault(name, []).append(x)  # one copy serves every whole-batch calculator
        return [chunk.unpad(outs[n]) if drop is not None else outs[n] for n in want]

    def _warn_uncut(self, name: str, chunk: Chunk) -> None:
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("tensor '%s': its dim 0 is not the model's batch of %d, so the %d padded copies of the "
                           "last run count in its statistics; use a batch size that is a multiple of %d",
                           name, chunk.padded, chunk.padded - chunk.real, chunk.padded)

    def _end_batch(self) -> None:
        """Feed the batch's merged reductions and whole tensors to their calculators and close their batch."""
        try:
            for name, calcs in self.tensor_calculators.items():
                for calc in calcs:
                    if getattr(calc, "supports_chunks", False):
                        calc.end_batch()
                    elif name in self._whole:
                        pieces = self._whole[name]
                        calc.observe(pieces[0] if len(pieces) == 1 else _concat_samples(name, pieces))
        except DataError as exc:
            raise DataError(f"tensor '{name}': {exc}") from exc
        if self._packed:
            for i, red in enumerate(self.reductions):
                vals = red.unpack(self._packed)
                for calc in red.calculators:
                    try:
                        _observe_reduced(calc, vals, self._counts[i])
                        calc.end_batch()
                    except DataError as exc:
                        raise DataError(f"tensor '{red.tensor}': {exc}") from exc
        self._reset_batch()


def _concat_samples(name: str, pieces: Sequence[np.ndarray]) -> np.ndarray:
    if any(p.ndim == 0 for p in pieces):
        raise DataError(f"tensor '{name}' is a scalar per run, so the runs of a batch cannot be joined for a "
                        "calculator that needs whole batches; give it supports_chunks/observe_chunk")
    return np.concatenate(pieces, axis=0)

