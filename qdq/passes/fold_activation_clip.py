"""Fold Relu / Clip into the QuantizeLinear after it, so the compute op before them meets its Q.

onnxruntime fuses ``DQ -> Conv -> Q`` into QLinearConv only when the Conv feeds the Q directly; a
Relu or Relu6 Clip in between leaves the Conv in float. Both rewrites here are exact (the quantized
integers do not change), because quantization ``Q`` is monotone:

* ``Q(clip(x, lo, hi)) == Q(x)`` when ``Q(lo) == qmin`` and ``Q(hi) == qmax``: the quantized range
  already lies inside the clip range, the activation is dropped. This is the usual case: Relu with an
  asymmetric Q (zero point = qmin), Relu6 with a range calibrated on [0, 6].
* otherwise ``Q(clip(x, lo, hi)) == clip(Q(x), Q(lo), Q(hi))``: the Clip moves after the Q and runs
  on the 8-bit integers (a symmetric Q after Relu, or a Q range reaching past 6 after Relu6, e.g. a
  pinned ``float_range`` or qparams shared with a wider tensor).

Only integer Q nodes whose input is produced by a Relu / Clip with constant bounds and read by
nothing else are rewritten; the integer Clip is used for per-tensor 8-bit Q nodes (what
onnxruntime's Clip kernel takes).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qdq.layout import QLayout
from qdq.numerics import quantize
from qdq.passes._qdq_nodes import const_array, drop_if_unused, is_q, qdtype, quant_ir_dtype, unique_initializer_name

__all__ = ["FoldActivationClipPass", "activation_bounds", "fold_activation_clip"]

logger = logging.getLogger(__name__)

_INT_CLIP_DTYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8})


def activation_bounds(act: ir.Node) -> tuple[float | None, float | None] | None:
    """(lo, hi) of a Relu / Clip with constant bounds (None = unbounded); None if not such a node."""
    if act.domain not in ("", "ai.onnx"):
        return None
    if act.op_type == "Relu":
        return 0.0, None
    if act.op_type != "Clip":
        return None
    out: list[float | None] = []
    for i, attr in ((1, "min"), (2, "max")):
        v = act.inputs[i] if len(act.inputs) > i else None
        if v is not None:
            arr = const_array(v)
            if arr is None or arr.size != 1:
                return None
            out.append(float(arr.reshape(())))
        else:
            a = act.attributes.get(attr)
            out.append(None if a is None else float(a.as_float()))
    return out[0], out[1]


def _quantized_bound(bound: float, q: ir.Node, np_dtype: np.dtype) -> np.ndarray:
    """Q(bound) for every scale of ``q`` (one value per tensor, or per channel / block)."""
    scale = const_array(q.inputs[1])
    zp = const_array(q.inputs[2]) if len(q.inputs) > 2 else None
    assert scale is not None
    scale = scale.reshape(-1)
    zp = None if zp is None else zp.reshape(-1)
    x = np.full(scale.shape, bound, np.float32)
    layout = QLayout() if scale.size == 1 else QLayout(axis=0)
    return quantize(x, scale if scale.size > 1 else scale.reshape(()), zp if zp is None or zp.size > 1
                    else zp.reshape(()), np_dtype, layout)


def _remove(graph: ir.Graph, act: ir.Node) -> None:
    bounds = list(act.inputs[1:])
    graph.remove(act, safe=True)
    for v in bounds:
        drop_if_unused(graph, v)


def _fold(graph: ir.Graph, q: ir.Node, move: bool = True) -> str | None:
    x_q = q.inputs[0]
    act = x_q.producer() if x_q is not None else None
    if act is None or x_q is None or x_q.is_graph_output() or len(x_q.uses()) != 1:
        return None
    bounds = activation_bounds(act)
    if bounds is None or act.inputs[0] is None:
        return None
    ir_dtype = quant_ir_dtype(q)
    dtype = qdtype(ir_dtype)
    if dtype is None or dtype.is_float or const_array(q.inputs[1]) is None:
        return None
    if len(q.inputs) > 2 and q.inputs[2] is not None and const_array(q.inputs[2]) is None:
        return None
    np_dtype = ir_dtype.numpy()
    qmin, qmax = int(dtype.qmin), int(dtype.qmax)
    lo, hi = bounds
    q_lo = None if lo is None else _quantized_bound(lo, q, np_dtype)
    q_hi = None if hi is None else _quantized_bound(hi, q, np_dtype)
    keep_lo = q_lo is not None and bool(np.any(q_lo.astype(np.int64) != qmin))
    keep_hi = q_hi is not None and bool(np.any(q_hi.astype(np.int64) != qmax))
    x = act.inputs[0]
    if not keep_lo and not keep_hi:
        q.replace_input_with(0, x)
        _remove(graph, act)
        q.metadata_props["qdq.folded_activation"] = act.op_type
        return "dropped"
    if not move:
        return None
    scale = const_array(q.inputs[1])
    if ir_dtype not in _INT_CLIP_DTYPES or scale is None or scale.size != 1:
        return None
    # Move the activation after the Q, clipping the integers: Q(x) -> Clip(lo_q, hi_q) -> readers of Q.
    key = q.metadata_props.get("qdq.target") or q.name or "activation"
    q_out = q.outputs[0]
    readers = list(q_out.uses())
    clip_inputs: list[ir.Value | None] = [q_out]
    for keep, qb, tag in ((keep_lo, q_lo, "min"), (keep_hi, q_hi, "max")):
        if not keep:
            clip_inputs.append(None)
            continue
        name = unique_initializer_name(graph, f"{key}_clip_{tag}")
        arr = np.asarray(qb).reshape(()).astype(np_dtype)
        v = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir_dtype),
                     const_value=ir.tensor(arr, dtype=ir_dtype, name=name))
        graph.register_initializer(v)
        clip_inputs.append(v)
    while clip_inputs and clip_inputs[-1] is None:
        clip_inputs.pop()
    clip = ir.Node("", "Clip", clip_inputs, name=act.name or f"{key}_clip", num_outputs=1)
    clip.metadata_props.update(act.metadata_props)
    out = clip.outputs[0]
    # The clipped integers keep the quantized tensor's name (``{key}_quantized``, read by its DQ).
    name = q_out.name or f"{key}_quantized"
    q_out.name = f"{name}_unclipped"
    out.name = name
    out.type = ir.TensorType(ir_dtype)
    out.shape = q_out.shape
    for use in readers:
        use.node.replace_input_with(use.idx, out)
    if q_out.is_graph_output():
        outputs = graph.outputs
        for i, o in enumerate(outputs):
            if o is q_out:
                outputs[i] = out
    q.replace_input_with(0, x)
    _remove(graph, act)
    graph.insert_after(q, clip)
    q.metadata_props["qdq.folded_activation"] = act.op_type
    return "moved"


def fold_activation_clip(model: ir.Model, *, move: bool = True) -> dict[str, int]:
    """Fold every Relu/Clip -> QuantizeLinear of ``model`` (in place); returns counts of dropped / moved.

    ``move=False`` only drops activations the Q's range makes redundant (a backend whose Q -> DQ pairs
    must stay adjacent, e.g. the torch-program lowering for Core ML / Core AI).
    """
    graph = model.graph
    counts = {"dropped": 0, "moved": 0}
    for node in graph:
        if is_q(node):
            what = _fold(graph, node, move)
            if what is not None:
                counts[what] += 1
    if counts["dropped"] or counts["moved"]:
        logger.info("activations before QuantizeLinear: %d dropped, %d moved to integers", counts["dropped"],
                    counts["moved"])
    return counts


class FoldActivationClipPass(ir.passes.InPlacePass):
    """Relu / Clip -> QuantizeLinear: drop the activation, or clip the integers after the Q (exact either way).

    ``move=False``: drop only (no integer Clip between a Q and its DQ).
    """

    def __init__(self, move: bool = True) -> None:
        super().__init__()
        self.move = move

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts = fold_activation_clip(model, move=self.move)
        return ir.passes.PassResult(model, modified=bool(counts["dropped"] or counts["moved"]))
