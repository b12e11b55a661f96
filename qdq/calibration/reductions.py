"""Statistics computed inside the calibration graph: Reduce* nodes after observed tensors.

A calculator that only needs min/max (per tensor or per channel) or per-channel sums of a
tensor gets them from ReduceMin/ReduceMax/ReduceSum nodes added right after the tensor's
producer; only the reduced numbers leave onnxruntime. Nothing assumes a layout: dim 0 of a
tensor is kept in the reduction only because onnxruntime parallelises over the kept rows (about
twice as fast on EfficientNet-Lite0 as reducing everything at once), and the host finishes the
rows whatever they mean (samples, heads x samples, sequence positions). Rank-0 tensors are read
as they are, tensors of unknown rank are reduced whole, float16/bfloat16 tensors are cast to
float first (exact).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["FINISH", "STATS", "GraphReductions", "Partial", "Reduction", "fetch_names"]

logger = logging.getLogger(__name__)

#: The statistics computed in the graph, and how a reduction kind uses them.
STATS = {"minmax": ("min", "max"), "sum": ("sum",)}
_REDUCE_OP = {"min": "ReduceMin", "max": "ReduceMax", "sum": "ReduceSum"}
FINISH = {"min": np.minimum, "max": np.maximum, "sum": np.add}
_CASTABLE = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclasses.dataclass
class Partial:
    """One graph output holding ``stat`` of ``tensor`` over every axis but ``keep``.

    ``rows``: the output's dim 0 is the tensor's dim 0, kept for speed and reduced on the host.
    ``offset``/``width``: where the finished result sits in the statistic's packed vector.
    """

    tensor: str
    stat: str
    keep: tuple[int, ...]
    output: str
    rows: bool
    offset: int
    width: int


@dataclasses.dataclass
class Reduction:
    """What one group of calculators reads: ``kind`` of ``tensor`` per ``axis`` (None: whole tensor).

    ``per_row``: elements reduced into each unit per kept row (static shapes), else read at run
    time from ``shape_output`` (the tensor's Shape): the count sums need.
    """

    tensor: str
    kind: str  # "minmax" or "sum"
    axis: int | None
    partials: list[Partial]
    per_row: int | None
    shape_output: str | None
    keep: tuple[int, ...]
    calculators: list[Any] = dataclasses.field(default_factory=list)

    def unpack(self, packed: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """The reduction's results (per-tensor results are 0-d) from the packed statistic vectors."""
        vals = []
        for part in self.partials:
            v = packed[part.stat][part.offset:part.offset + part.width]
            if self.axis is None:  # finish the per-tensor statistic over the kept channels
                v = FINISH[part.stat].reduce(v).reshape(())
            vals.append(v)
        return tuple(vals)

    def count(self, rows: int, shape: np.ndarray | None) -> int:
        """Elements summed into each unit over ``rows`` kept rows (``shape``: the run's tensor shape)."""
        per_row = self.per_row
        if per_row is None:
            assert shape is not None
            dims = [int(d) for d in shape]
            per_row = int(math.prod(d for i, d in enumerate(dims) if i not in self.keep))
        return per_row * rows


class GraphReductions:
    """Adds reductions to a graph (each result a graph output) and finishes their rows on the host.

    (Packing the results in the graph with Reshape + Concat made runs 2.5x slower on
    EfficientNet-Lite0: they are packed on the host instead, one vector per statistic.)
    """

    def __init__(self, graph: ir.Graph, opset: int, taken: set[str]) -> None:
        self.graph, self.opset, self.taken = graph, opset, taken
        self.partials: dict[tuple[str, str, tuple[int, ...]], Partial] = {}
        self.sizes: dict[str, int] = {stat: 0 for stat in _REDUCE_OP}
        self._float: dict[str, ir.Value] = {}
        self._shapes: dict[str, str] = {}
        self.stat_partials: dict[str, list[Partial]] = {}

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
    def plan(value: ir.Value, red: tuple[str, int | None] | None) -> tuple[str, int | None, tuple[int, ...]] | None:
        """(kind, axis, kept axes) when onnxruntime can compute ``red`` of ``value``, else None (copy it out)."""
        if red is None or red[0] not in STATS or value.producer() is None:
            return None  # graph inputs and initializers: the calculators read the feeds
        if value.dtype != ir.DataType.FLOAT and value.dtype not in _CASTABLE:
            return None
        kind, axis = red
        if value.shape is None:  # unknown rank: only a whole-tensor reduction
            return (kind, None, ()) if axis is None and kind == "minmax" else None
        dims = list(value.shape)
        if axis is None:
            if kind != "minmax":
                return None
            if not dims:
                return kind, None, ()
            return kind, None, ((0, 1) if len(dims) >= 3 and isinstance(dims[1], int) else (0,))
        if not -len(dims) <= axis < len(dims):
            return None
        axis %= len(dims)
        if not isinstance(dims[axis], int):
            return None  # an unknown number of channels
        return kind, axis, ((0,) if axis == 0 else (0, axis))

    def _float_value(self, value: ir.Value) -> ir.Value:
        """``value`` itself when float32, else a Cast of it to float32 (float16/bfloat16: exact)."""
        if value.dtype == ir.DataType.FLOAT:
            return value
        base = value.name or "t"
        if base not in self._float:
            node = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT.value)],
                           name=self.fresh(f"{base}__qdq_cast"))
            out = node.outputs[0]
            out.name, out.dtype = self.fresh(f"{base}__qdq_float"), ir.DataType.FLOAT
            out.shape = value.shape
            producer = value.producer()
            assert producer is not None
            self.graph.insert_after(producer, [node])
            self._float[base] = out
        return self._float[base]

    def shape_output(self, value: ir.Value) -> str:
        """A graph output with ``value``'s runtime shape (int64), added once per tensor."""
        base = value.name or "t"
        if base not in self._shapes:
            node = ir.Node("", "Shape", [value], name=self.fresh(f"{base}__qdq_Shape"))
            out = node.outputs[0]
            out.name, out.dtype = self.fresh(f"{base}__qdq_shape"), ir.DataType.INT64
            producer = value.producer()
            assert producer is not None
            self.graph.insert_after(producer, [node])
            self.graph.outputs.append(out)
            self._shapes[base] = out.name
        return self._shapes[base]

    def add(self, value: ir.Value, kind: str, axis: int | None, keep: tuple[int, ...]) -> Reduction:
        base = value.name or "t"
        dims = list(value.shape) if value.shape is not None else None
        nodes: list[ir.Node] = []
        partials = []
        for stat in STATS[kind]:
            key = (base, stat, keep)
            if key not in self.partials:
                rows = bool(keep) and keep[0] == 0 and axis != 0
                width = 1
                for i in keep:
                    if i != 0 or not rows:
                        width *= int(dims[i])  # type: ignore[index,arg-type]  # static, checked in plan()
                src = self._float_value(value)
                axes = [] if dims is None else [i for i in range(len(dims)) if i not in keep]
                if dims is not None and not axes:  # e.g. a scalar, or per-channel of [N, C]: the tensor is the partial
                    if not src.is_graph_output():
                        self.graph.outputs.append(src)
                    output = src.name or ""
                else:
                    op = _REDUCE_OP[stat]
                    inputs: list[ir.Value | None] = [src]
                    attrs: list[ir.Attr] = [ir.AttrInt64("keepdims", 0)]
                    if axes:
                        if self.opset >= (13 if op == "ReduceSum" else 18):  # axes became an input
                            inputs.append(self.const(f"{base}__qdq_axes", np.asarray(axes, np.int64)))
                        else:
                            attrs.append(ir.AttrInt64s("axes", axes))
                    node = ir.Node("", op, inputs, attributes=attrs, name=self.fresh(f"{base}__qdq_{op}"))
                    out = node.outputs[0]
                    out.name = self.fresh(f"{base}__qdq_{stat}")
                    out.dtype = ir.DataType.FLOAT
                    nodes.append(node)
                    self.graph.outputs.append(out)
                    output = out.name
                part = Partial(base, stat, keep, output, rows, self.sizes[stat], width)
                self.partials[key] = part
                self.stat_partials.setdefault(stat, []).append(part)
                self.sizes[stat] += width
            partials.append(self.partials[key])
        if nodes:
            anchor = self._float.get(base, value).producer()
            assert anchor is not None
            self.graph.insert_after(anchor, nodes)
        per_row: int | None = None
        shape_out: str | None = None
        if kind == "sum":
            reduced = [d for i, d in enumerate(dims or []) if i not in keep]
            if dims is not None and all(isinstance(d, int) for d in reduced):
                per_row = int(math.prod(reduced))  # type: ignore[arg-type]
            else:
                shape_out = self.shape_output(value)
        return Reduction(base, kind, axis, partials, per_row, shape_out, keep)

    # ------------------------------------------------------------------ host side
    def finish(self, outs: Mapping[str, np.ndarray], acc: dict[str, np.ndarray], *,
               drop: tuple[int, int] | None = None) -> set[str]:
        """Reduce one run's partial outputs over their rows and merge them into ``acc`` (stat -> packed vector).

        ``drop=(padded, real)``: a run padded to ``padded`` samples; the sums of partials whose row
        count is ``padded`` keep only the first ``real`` rows (copies do not count twice). Returns
        the tensors whose sums could not be cut that way (their rows are not the samples).
        """
        uncut: set[str] = set()
        for stat, parts in self.stat_partials.items():
            finish = FINISH[stat]
            arrays = [outs[p.output] for p in parts]
            cut = drop is not None and stat == "sum"
            lead = {a.shape[0] for p, a in zip(parts, arrays) if p.rows}
            if not cut and len(lead) == 1 and all(p.rows for p in parts):
                n = lead.pop()  # one vectorised finish for the common case (all rows alike)
                v = finish.reduce(np.concatenate([a.reshape(n, -1) for a in arrays], axis=1), axis=0)
            else:
                pieces = []
                for p, a in zip(parts, arrays):
                    if p.rows:
                        if cut and drop is not None:
                            if a.shape[0] == drop[0]:
                                a = a[:drop[1]]
                            else:
                                uncut.add(p.tensor)
                        a = finish.reduce(a.reshape(a.shape[0], -1), axis=0)
                    elif cut:
                        uncut.add(p.tensor)
                    pieces.append(np.asarray(a, np.float32).reshape(-1))
                v = np.concatenate(pieces)
            old = acc.get(stat)
            acc[stat] = v if old is None else finish(old, v)
        return uncut

    def rows_counted(self, red: Reduction, outs: Mapping[str, np.ndarray], drop: tuple[int, int] | None) -> int:
        """Rows of ``red``'s tensor that went into this run's sums (after dropping padded copies)."""
        part = red.partials[0]
        if not part.rows:
            return 1
        rows = int(outs[part.output].shape[0])
        return drop[1] if drop is not None and rows == drop[0] else rows


def fetch_names(reductions: GraphReductions) -> list[str]:
    """Every partial output, once, in statistic order."""
    return list(dict.fromkeys(p.output for parts in reductions.stat_partials.values() for p in parts))
