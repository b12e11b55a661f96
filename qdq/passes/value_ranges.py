"""Static facts about float tensors that placement needs: a value interval and "is mask arithmetic".

Intervals come from one walk in graph order: activations with a known range (Relu, Sigmoid,
Softmax, HardSwish, Gelu, ...), ops that keep or combine ranges (pooling, reductions to a mean or
extreme, shape ops, Concat, Add, Sub, Mul) and small constants. Annotation uses them for the
integer grid: a tensor that is non-negative or bounded below only (one-sided, e.g. after HardSwish
or Gelu) gets an asymmetric grid, so no codes are wasted on values that cannot occur.

Mask arithmetic is float math on integer inputs (``Cast(attention_mask)``, ``(1 - m) * finfo.min``)
combined only with small constants. Quantizing it is destructive: one huge constant sets the scale of
every tensor it meets. Such tensors stay float, and so does the output of an Add/Sub that applies an
additive mask to real activations (its range spans the mask's huge negatives).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

__all__ = ["UNKNOWN", "Interval", "ValueFacts"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Interval:
    """Closed value interval ``[lo, hi]``; ``-inf`` / ``inf`` when unbounded."""

    lo: float
    hi: float

    @property
    def nonnegative(self) -> bool:
        return self.lo >= 0.0

    @property
    def one_sided(self) -> bool:
        """Non-negative, or bounded below with no upper bound (HardSwish, Gelu, Elu, ...)."""
        return self.nonnegative or (math.isfinite(self.lo) and math.isinf(self.hi))

    def hull(self, other: Interval) -> Interval:
        return Interval(min(self.lo, other.lo), max(self.hi, other.hi))


UNKNOWN = Interval(-math.inf, math.inf)

_FLOAT = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_MAX_CONST_ELEMENTS = 4096  # larger constants (weights, tables) are not scanned for their range
_MASK_CONST_ELEMENTS = 16  # mask arithmetic uses scalars (1.0, -10000, finfo.min); embedding tables are larger

#: Fixed output ranges (lower bound, upper bound as a function of the input's upper bound).
_BOUNDED = {
    "Sigmoid": (0.0, 1.0), "HardSigmoid": (0.0, 1.0), "Softmax": (0.0, 1.0), "Tanh": (-1.0, 1.0),
    "Softsign": (-1.0, 1.0), "Softplus": (0.0, math.inf), "Exp": (0.0, math.inf), "Sqrt": (0.0, math.inf),
}
#: Activations bounded below by a constant, and by max(x, 0) above.
_BELOW = {"HardSwish": -0.375, "Gelu": -0.17, "Mish": -0.31, "Selu": -1.7581, "Elu": -1.0, "Celu": -1.0}
#: Ops whose output values are values (or convex combinations) of their first input.
_KEEPS_RANGE = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity", "Slice", "Gather",
    "Expand", "Split", "Tile", "DepthToSpace", "SpaceToDepth", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceMin", "Resize", "Upsample", "Dropout", "GatherElements",
})
#: Ops through which additive-mask values pass to their output.
_ADDITIVE = frozenset({"Add", "Sub", "Where", "Max", "Min", "Sum"})


def _is_float(value: ir.Value) -> bool:
    return value.dtype is None or value.dtype in _FLOAT


def _small_constant(value: ir.Value) -> np.ndarray | None:
    tensor = value.const_value
    if tensor is None or math.prod(tensor.shape.numpy()) > _MAX_CONST_ELEMENTS:
        return None
    return tensor.numpy()


def _mul(a: Interval, b: Interval) -> Interval:
    """Interval product with 0 * inf = 0 (bounds, not values)."""
    products = [0.0 if (x == 0.0 or y == 0.0) else x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return Interval(min(products), max(products))


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


class ValueFacts:
    """Intervals and mask flags of a graph's tensors, from one walk over its nodes (graph order)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._intervals: dict[int, Interval] = {}
        self._masks: set[int] = set()
        for node in graph:
            self._visit(node)

    def interval(self, value: ir.Value) -> Interval:
        """The known range of ``value`` (UNKNOWN for graph inputs and unanalysed ops)."""
        known = self._intervals.get(id(value))
        if known is not None:
            return known
        const = _small_constant(value)
        if const is not None and const.size and np.issubdtype(const.dtype, np.floating):
            return Interval(float(np.min(const)), float(np.max(const)))
        return UNKNOWN

    def is_mask(self, value: ir.Value) -> bool:
        """True when ``value`` is float arithmetic on integer inputs and small constants only."""
        return id(value) in self._masks

    def applies_mask(self, node: ir.Node) -> bool:
        """An Add/Sub/Where/... that adds mask values to a real activation: its output spans the mask's range."""
        return node.op_type in _ADDITIVE and any(v is not None and self.is_mask(v) for v in node.inputs)

    def _visit(self, node: ir.Node) -> None:
        if self._mask_op(node):
            self._masks.update(id(o) for o in node.outputs if _is_float(o))
        if not node.outputs or node.domain not in ("", "ai.onnx"):
            return
        interval = self._output_interval(node)
        if interval is not UNKNOWN:
            for out in node.outputs:
                self._intervals[id(out)] = interval

    def _mask_op(self, node: ir.Node) -> bool:
        """Float outputs computed from integer/bool tensors, mask values and small constants only.

        ``Cast(mask)``, ``Where(mask_bool, 0, finfo.min)``, ``(1 - m) * -10000``: at least one input is a
        mask value or a computed integer/bool tensor, and every float input is a mask value or a small constant.
        """
        saw_mask = False
        for v in node.inputs:
            if v is None:
                continue
            if id(v) in self._masks or (not _is_float(v) and v.const_value is None):
                saw_mask = True
            elif _is_float(v) and (v.const_value is None or v.const_value.size > _MASK_CONST_ELEMENTS):
                return False
        return saw_mask

    def _output_interval(self, node: ir.Node) -> Interval:
        op = node.op_type
        ins = [self.interval(v) if v is not None else UNKNOWN for v in node.inputs]
        first = ins[0] if ins else UNKNOWN
        if op == "Relu":
            return Interval(max(first.lo, 0.0), max(first.hi, 0.0))
        if op in _BOUNDED:
            return Interval(*_BOUNDED[op])
        if op in _BELOW:
            lo = _BELOW[op] * (_attr_float(node, "alpha", 1.0) if op in ("Elu", "Celu") else 1.0)
            return Interval(max(lo, min(first.lo, 0.0)) if first.lo > -math.inf else lo, max(first.hi, 0.0))
        if op == "Clip":
            return self._clip(node, first)
        if op in _KEEPS_RANGE:
            return first
        if op == "Concat":
            out = ins[0]
            for i in ins[1:]:
                out = out.hull(i)
            return out
        if op == "Add" and len(ins) == 2:
            return Interval(ins[0].lo + ins[1].lo, ins[0].hi + ins[1].hi)
        if op == "Sub" and len(ins) == 2:
            return Interval(ins[0].lo - ins[1].hi, ins[0].hi - ins[1].lo)
        if op == "Mul" and len(ins) == 2:
            return _mul(ins[0], ins[1])
        if op == "Abs":
            return Interval(0.0, max(abs(first.lo), abs(first.hi)))
        return UNKNOWN

    def _clip(self, node: ir.Node, first: Interval) -> Interval:
        bounds = []
        for idx, name, default in ((1, "min", -math.inf), (2, "max", math.inf)):
            bound = default
            if len(node.inputs) > idx and node.inputs[idx] is not None:
                const = _small_constant(node.inputs[idx])  # type: ignore[arg-type]
                bound = float(const.reshape(-1)[0]) if const is not None and const.size else default
            elif node.attributes.get(name) is not None:
                bound = _attr_float(node, name, default)
            bounds.append(bound)
        return Interval(min(max(first.lo, bounds[0]), bounds[1]), max(min(first.hi, bounds[1]), bounds[0]))
