"""Run a float model in onnxruntime and stream chosen intermediate tensors to calculators.

One session of the float model serves every observed tensor. A calculator that only needs a
reduction of its tensor (min/max for the min/max calculators, per-channel sums for bias
correction: :meth:`~qdq.calibration.base.QParamsCalculatorBase.graph_reduction`) gets it from
ReduceMin/ReduceMax/ReduceSum nodes added to the graph: onnxruntime's threads reduce the
tensor, which is never copied out; only the few numbers of the reduction leave the session.
Calculators that need the tensor itself (histograms) get it as an extra graph output. Each
batch's results go straight to the calculators and are dropped before the next batch: memory
is bounded by one micro-batch, not by the number of samples.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qdq.errors import DataError, ModelError
from qdq.session import OPT_LEVELS, make_session, session_options

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
        feeds[name] = np.ascontiguousarray(x)
    return feeds


#: Bytes of observed activations one onnxruntime run may produce; larger batches run in micro-batches.
#: Counts the tensors copied out (histograms) and, from static shapes, the ones reduced in the graph
#: (their size drives onnxruntime's activation memory). EfficientNet-Lite0 (26.5 MiB of observed
#: activations per sample, 2 threads) at 1 / 2 / 4 samples per run: 2.5 / 2.5 / 2.4 s and
#: 310 / 378 / 502 MB peak RSS for ``qdq quantize`` on 256 images: small runs cost nothing.
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


def _per_sample_bytes(value: ir.Value) -> int | None:
    """Bytes of one sample of ``value`` from its static shape (dim 0 = batch), None if unknown."""
    shape, dtype = value.shape, value.dtype
    if shape is None or dtype is None or len(shape) == 0:
        return None
    dims = list(shape)[1:]
    if not all(isinstance(d, int) for d in dims):
        return None
    count = 1
    for d in dims:
        count *= int(d)  # type: ignore[arg-type]  # all ints, checked above
    return int(count * dtype.itemsize)


#: The statistics computed in the graph, and how a reduction kind uses them.
_STATS = {"minmax": ("min", "max"), "sum": ("sum",)}
_REDUCE_OP = {"min": "ReduceMin", "max": "ReduceMax", "sum": "ReduceSum"}
_FINISH = {"min": np.minimum, "max": np.maximum, "sum": np.add}


@dataclasses.dataclass
class _Partial:
    """One Reduce* node: ``stat`` of ``tensor`` over every axis but ``keep`` (dim 0 and a channel axis).

    onnxruntime parallelises a reduction over the kept rows, so reducing H and W per (sample,
    channel) runs about twice as fast as reducing everything at once (EfficientNet-Lite0, 2
    threads); the host finishes the few numbers left. ``offset``/``width``: where the result,
    reduced over samples, sits in the statistic's packed vector.
    """

    tensor: str
    stat: str
    keep: tuple[int, ...]
    output: str
    offset: int
    width: int


@dataclasses.dataclass
class _Reduction:
    """What one group of calculators reads: ``kind`` of ``tensor`` per ``axis``, from its partials."""

    tensor: str
    kind: str  # "minmax" or "sum"
    axis: int | None
    count_per_sample: int  # elements per reduced unit in one sample
    partials: list[_Partial]
    calculators: list[Any] = dataclasses.field(default_factory=list)

    def unpack(self, packed: Mapping[str, np.ndarray], samples: int) -> tuple[tuple[np.ndarray, ...], int]:
        """The reduction's results for ``samples`` samples (per-tensor results are 0-d) and its element count."""
        vals = []
        for part in self.partials:
            v = packed[part.stat][part.offset:part.offset + part.width]
            if self.axis is None:  # finish the per-tensor statistic over the kept channels
                v = _FINISH[part.stat].reduce(v).reshape(())
            vals.append(v)
        return tuple(vals), self.count_per_sample * samples


class _GraphBuilder:
    """Adds reductions to a graph: Reduce* nodes right after each reduced tensor's producer, each result
    a graph output. (Packing them in the graph with Reshape + Concat made runs 2.5x slower on
    EfficientNet-Lite0: the runner packs them on the host instead, one vector per statistic.)"""

    def __init__(self, graph: ir.Graph, opset: int, taken: set[str]) -> None:
        self.graph, self.opset, self.taken = graph, opset, taken
        self.partials: dict[tuple[str, str, tuple[int, ...]], _Partial] = {}
        self.sizes: dict[str, int] = {stat: 0 for stat in _REDUCE_OP}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=self.fresh(base))
        value = ir.Value(name=tensor.name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(list(array.shape)),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    @staticmethod
    def plan(value: ir.Value, red: tuple[str, int | None] | None) -> tuple[str, int | None, tuple[int, ...], int] | None:
        """(kind, axis, kept axes, elements per unit and sample) when onnxruntime can compute ``red`` of ``value``."""
        if red is None or red[0] not in _STATS or value.producer() is None:
            return None  # graph inputs: the calculators read the feeds
        if value.dtype != ir.DataType.FLOAT or value.shape is None or len(value.shape) < 2:
            return None
        kind, axis = red
        dims = list(value.shape)
        if axis is not None:
            if not -len(dims) <= axis < len(dims):
                return None
            axis %= len(dims)
            if axis == 0 or not isinstance(dims[axis], int):
                return None  # per-sample statistics, or an unknown number of channels
            keep: tuple[int, ...] = (0, axis)
        else:
            keep = (0, 1) if len(dims) >= 3 and isinstance(dims[1], int) else (0,)
        rest = dims[1:]
        if not all(isinstance(d, int) for d in rest):
            return None
        units = 1 if axis is None else int(dims[axis])  # type: ignore[arg-type]
        return kind, axis, keep, int(math.prod(rest)) // units  # type: ignore[arg-type]

    def add(self, value: ir.Value, kind: str, axis: int | None, keep: tuple[int, ...], per_unit: int) -> _Reduction:
        base = value.name or "t"
        dims = list(value.shape or ())
        nodes: list[ir.Node] = []
        partials = []
        for stat in _STATS[kind]:
            key = (base, stat, keep)
            if key not in self.partials:
                op = _REDUCE_OP[stat]
                axes = [i for i in range(len(dims)) if i not in keep]
                width = 1
                for i in keep[1:]:
                    width *= int(dims[i])  # type: ignore[arg-type]  # static, checked in plan()
                if not axes:  # e.g. per-channel of a [N, C] tensor: the tensor is the partial result
                    if not value.is_graph_output():
                        self.graph.outputs.append(value)
                    self.partials[key] = _Partial(base, stat, keep, base, self.sizes[stat], width)
                    self.sizes[stat] += width
                    partials.append(self.partials[key])
                    continue
                inputs: list[ir.Value | None] = [value]
                attrs: list[ir.Attr] = [ir.AttrInt64("keepdims", 0)]
                if self.opset >= (13 if op == "ReduceSum" else 18):  # axes became an input
                    inputs.append(self.const(f"{base}__qdq_axes", np.asarray(axes, np.int64)))
                else:
                    attrs.append(ir.AttrInt64s("axes", axes))
                node = ir.Node("", op, inputs, attributes=attrs, name=self.fresh(f"{base}__qdq_{op}"))
                out = node.outputs[0]
                out.name = self.fresh(f"{base}__qdq_{stat}")
                out.dtype = ir.DataType.FLOAT  # reductions of float tensors only (see plan)
                nodes.append(node)
                self.graph.outputs.append(out)
                self.partials[key] = _Partial(base, stat, keep, out.name, self.sizes[stat], width)
                self.sizes[stat] += width
            partials.append(self.partials[key])
        if nodes:
            producer = value.producer()
            assert producer is not None
            self.graph.insert_after(producer, nodes)
        return _Reduction(base, kind, axis, per_unit, partials)


class CalibrationRunner:
    """Float-model session whose extra outputs feed ``calculators`` (tensor name -> calculators).

    Reductions (see the module docstring) run inside the session; their results are packed into
    one vector per statistic, micro-batches are merged there (min, max, sum) and every such
    calculator is fed once per batch. Tensors copied out are held by onnxruntime all at once, so
    memory would scale with the batch size times all observed activations: when every
    calculator accepts a batch in pieces, a batch runs as micro-batches sized to ``chunk_bytes``
    and each calculator closes the batch once: same statistics, bounded memory.
    """

    def __init__(self, model: ir.Model, calculators: Mapping[str, Sequence[Any]],
                 *, outputs: bool = False, threads: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.calculators = {k: list(v) for k, v in calculators.items() if v}
        clone = model.clone()  # shares the weights: no copy
        graph = clone.graph
        self.output_names = [v.name or "" for v in graph.outputs] if outputs else []
        self.input_names = [v.name or "" for v in graph.inputs]
        values: dict[str, ir.Value] = {v.name or "": v for v in graph.inputs}
        for node in graph:
            for out in node.outputs:
                values[out.name or ""] = out
        opset = clone.opset_imports.get("", clone.opset_imports.get("ai.onnx", 13))
        builder = _GraphBuilder(graph, opset, set(values) | set(graph.initializers))

        self.reductions: list[_Reduction] = []
        self.tensor_calculators: dict[str, list[Any]] = {}
        by_key: dict[tuple[str, str, int | None], _Reduction] = {}
        for name, calcs in self.calculators.items():
            value = values.get(name)
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
        #: statistic -> graph outputs of its partial reductions, in offset order
        self._stat_outputs: dict[str, list[str]] = {}
        for part in sorted(builder.partials.values(), key=lambda p: p.offset):
            self._stat_outputs.setdefault(part.stat, []).append(part.output)
        # Tensors copied out: extra graph outputs (graph inputs come straight from the feeds).
        present = {v.name for v in graph.outputs}
        for name in self.tensor_calculators:
            if name not in present and name not in self.input_names:
                graph.outputs.append(values[name])
        # The arena keeps peak RSS steady (without it glibc fragmentation made the peak vary 270-400 MB).
        self.session = make_session(clone, threads=threads)
        copied = [n for n in self.tensor_calculators if n not in self.input_names and n not in self.output_names]
        self.fetch = self.output_names + copied + [n for names in self._stat_outputs.values() for n in names]
        self._num_copied = len(self.output_names) + len(copied)
        self._packed: dict[str, np.ndarray] = {}
        self._packed_samples = 0
        self.num_batches = 0
        self.num_runs = 0
        self.chunk_bytes = chunk_bytes
        self.chunkable = all(getattr(c, "supports_chunks", False) for cs in self.tensor_calculators.values() for c in cs)
        #: bytes per sample of the tensors reduced in the graph (static shapes; distinct tensors once)
        reduced = {r.tensor for r in self.reductions} - set(self.tensor_calculators)
        self.reduced_bytes_per_sample = float(sum(_per_sample_bytes(values[n]) or 0 for n in reduced))
        #: bytes per sample copied out (measured on the first run) plus reduced_bytes_per_sample
        self.bytes_per_sample: float | None = None
        if not copied and not self.output_names:
            self.bytes_per_sample = self.reduced_bytes_per_sample
        logger.debug("calibration runner: %d in-graph reductions, %d tensors copied out",
                     len(self.reductions), len(copied))

    def observe(self, batch: Any) -> list[np.ndarray]:
        """Run one batch, update every calculator; returns the model outputs (if ``outputs``)."""
        feeds = as_feeds(batch, self.input_names)
        for name, x in feeds.items():
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise DataError(f"NaN/Inf in calibration input '{name}' (batch {self.num_batches}); clean the data")
        n = _batch_len(feeds)
        if not self.chunkable or n is None or n <= 1:
            results = self._run(feeds, whole=True)
        else:
            parts, start = [], 0
            while start < n:  # the first run ever is 1 sample: it measures the bytes copied per sample
                step = 1 if self.bytes_per_sample is None else self._step()
                parts.append(self._run({k: v[start:start + step] for k, v in feeds.items()}, whole=False))
                start += step
            for calcs in self.tensor_calculators.values():
                for calc in calcs:
                    calc.end_batch()
            results = [np.concatenate(p) for p in zip(*parts)] if self.output_names else []
        self._flush()
        self.num_batches += 1
        return results

    def _step(self) -> int:
        return max(1, int(self.chunk_bytes // max(self.bytes_per_sample or 1.0, 1.0)))

    def _run(self, feeds: dict[str, np.ndarray], *, whole: bool) -> list[np.ndarray]:
        outs = self.session.run(self.fetch, feeds) if self.fetch else []
        self.num_runs += 1
        samples = _batch_len(feeds) or 1
        if self.bytes_per_sample is None and outs:
            copied = sum(o.nbytes for o in outs[: self._num_copied])
            self.bytes_per_sample = copied / samples + self.reduced_bytes_per_sample
        start = self._num_copied
        for stat, names in self._stat_outputs.items():
            parts = outs[start:start + len(names)]
            start += len(names)
            finish = _FINISH[stat]
            v = finish.reduce(np.concatenate([o.reshape(o.shape[0], -1) for o in parts], axis=1), axis=0)
            old = self._packed.get(stat)
            self._packed[stat] = v if old is None else finish(old, v)
        self._packed_samples += samples
        tensors = dict(zip(self.fetch[: self._num_copied], outs))
        del outs
        results = [tensors[n] for n in self.output_names]
        for name, calcs in self.tensor_calculators.items():
            x = tensors.pop(name) if name in tensors else feeds[name]
            for calc in calcs:
                try:
                    calc.observe(x) if whole else calc.observe_chunk(x)
                except DataError as exc:
                    raise DataError(f"tensor '{name}': {exc}") from exc
            del x
        return results

    def _flush(self) -> None:
        """Feed the batch's merged reductions to their calculators and close their batch."""
        if not self._packed:
            return
        for red in self.reductions:
            vals, count = red.unpack(self._packed, self._packed_samples)
            for calc in red.calculators:
                try:
                    _observe_reduced(calc, vals, count)
                    calc.end_batch()
                except DataError as exc:
                    raise DataError(f"tensor '{red.tensor}': {exc}") from exc
        self._packed, self._packed_samples = {}, 0


def _batch_len(feeds: dict[str, np.ndarray]) -> int | None:
    """The common first dimension of all inputs (None when inputs disagree or are scalars)."""
    sizes = {v.shape[0] if v.ndim else None for v in feeds.values()}
    return sizes.pop() if len(sizes) == 1 else None
