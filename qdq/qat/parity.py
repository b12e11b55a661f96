"""Numerical parity between the torch mirror and onnxruntime: integer codes at every quantized tensor.

:func:`code_parity` runs the exported QDQ model in onnxruntime with every DQ output fetched, runs
the mirror (eval mode) on the same inputs, and compares the codes ``QuantizeLinear`` produces at
each target. onnxruntime cannot hand int4 tensors to numpy, so its codes are recovered from the
DQ outputs with the reference numerics (exact: ``(q - zp) * s / s`` rounds back to ``q``).

Codes may legitimately differ by one step where the two runtimes sum in a different order: each
:class:`CodeParity` counts the elements whose onnxruntime pre-rounding value lies within a float32
error bound of a rounding boundary (``near``) and the differing codes outside them (``unexplained``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qdq import numerics
from qdq.calibration.runner import as_feeds
from qdq.dtypes import QDType
from qdq.model_io import load_model
from qdq.qat.onnx_module import OnnxModule
from qdq.session import make_session

__all__ = ["CodeParity", "accumulation_length", "code_parity", "summarize", "unexplained"]


@dataclasses.dataclass(frozen=True)
class CodeParity:
    """Agreement of one target's codes: ``equal`` of ``total`` identical, ``max_steps`` apart at worst.

    ``near``: elements within float32 rounding of a rounding boundary; ``unexplained``: differing codes
    elsewhere; ``upstream_differs``: (free-running) codes of some target upstream differ, so this
    tensor's inputs differ and its codes may differ anywhere.
    """

    key: str
    dtype: QDType
    kind: str
    total: int
    equal: int
    max_steps: int
    near: int = 0
    unexplained: int = 0
    upstream_differs: bool = False

    @property
    def fraction(self) -> float:
        return self.equal / self.total if self.total else 1.0


def _ordinal(codes: np.ndarray, dtype: QDType) -> np.ndarray:
    """Codes as integers where neighbouring representable values differ by 1 (float8 included)."""
    if not dtype.is_float:
        return np.asarray(codes, np.float64).astype(np.int64)
    bits = np.asarray(codes, np.float32).astype(dtype.np_dtype).view(np.uint8).astype(np.int64)
    return np.where(bits & 0x80, -(bits & 0x7F), bits)


_EPS32 = float(np.finfo(np.float32).eps)
# ops whose result is a sum over the input (error grows with the number of terms summed)
_REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare",
               "GlobalAveragePool", "AveragePool", "LayerNormalization", "BatchNormalization",
               "InstanceNormalization"}
# a few ulps for elementwise library functions (vectorized exp/tanh/erf approximations differ by some ulps)
_FUNCTION_ULPS = 4


def _numel(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    dims = [d for d in value.shape if isinstance(d, int)]
    return math.prod(dims, start=1) if len(dims) == len(value.shape) else None


def _dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or not value.shape:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def accumulation_length(node: ir.Node | None) -> int:
    """How many float terms one output element of ``node`` sums (1 for elementwise ops).

    Two runtimes that add them in a different order agree to within about this many float32
    roundings of the operands' magnitude; unknown shapes fall back to the input/output size ratio.
    """
    if node is None:
        return 1
    op, ins = node.op_type, node.inputs
    k: int | None = None
    if op in ("Conv", "ConvInteger") and len(ins) > 1:
        n, cout = _numel(ins[1]), _dim(ins[1], 0)
        k = n // cout if n and cout else None
    elif op == "ConvTranspose" and len(ins) > 1:
        n, cout = _numel(ins[1]), _dim(ins[1], 1)
        group = node.attributes.get_int("group", 1)
        k = n // (cout * group) if n and cout else None
    elif op == "MatMul":
        k = _dim(ins[0], -1)
    elif op == "Gemm":
        k = _dim(ins[0], 0 if node.attributes.get_int("transA", 0) else -1)
    elif op in ("Softmax", "LogSoftmax"):
        k = _dim(ins[0], node.attributes.get_int("axis", -1))
    elif op in _REDUCE_OPS or op == "Einsum":
        n_in, n_out = _numel(ins[0]), _numel(node.outputs[0])
        k = n_in // n_out if n_in and n_out else None
    else:
        return 1
    if k is None:  # unknown shapes: the largest input per output element bounds the terms summed
        n_out = _numel(node.outputs[0])
        sizes = [_numel(v) for v in ins if v is not None]
        k = max((n // n_out for n in sizes if n and n_out), default=1)
    return max(1, int(k))


def _near_boundary(x: np.ndarray, k: int, scale: np.ndarray, zp: np.ndarray | None, dtype: QDType,
                   layout: Any) -> np.ndarray:
    """Elements of ``x`` whose code changes within ``+-delta``: delta = 2 * (k + a few) float32 roundings of
    the tensor's largest magnitude (both runtimes' errors), the most a different summation order moves them."""
    finite = np.abs(x[np.isfinite(x)])
    delta = 2 * (k + _FUNCTION_ULPS) * _EPS32 * (float(finite.max()) if finite.size else 0.0)
    lo = numerics.quantize(x - delta, scale, zp, dtype, layout)
    hi = numerics.quantize(x + delta, scale, zp, dtype, layout)
    return np.asarray(lo != hi)


def code_parity(module: OnnxModule, model: Any, *inputs: Any, teacher_forcing: bool = False,
                level: str = "none") -> dict[str, CodeParity]:
    """Compare codes of ``module`` (eval mode) with ``model`` (prepared QDQ, e.g. the export) in onnxruntime.

    Free-running (default), each side computes from its own upstream values, so a code that
    differs by one step early on can move later codes by more than one step on a finer grid.
    With ``teacher_forcing`` the mirror's fake-quant outputs are replaced by onnxruntime's, so each
    tensor's codes measure one op's float rounding only. ``level`` is the onnxruntime
    optimization level: ``none`` runs the QDQ graph as written (what :meth:`qdq.quantizer.Quantizer.run`
    does); from ``basic`` on onnxruntime rounds Conv/Gemm biases to int32 (compare a mirror built
    with ``quantize_bias=True`` there).
    """
    clone = load_model(model).clone()
    graph = clone.graph
    values = {v.name: v for node in graph for v in node.outputs}
    present = {v.name for v in graph.outputs}
    q_nodes = {node.name: node for node in graph if node.op_type == "QuantizeLinear"}
    pre: dict[str, str] = {}  # site key -> name of the float tensor its QuantizeLinear rounds
    for key, site in module.sites.items():
        q_in = q_nodes[site.q_node].inputs[0] if site.q_node in q_nodes else None
        for v in (values.get(site.output), q_in if q_in is not None and not q_in.is_initializer() else None):
            if v is not None and v.name not in present and not v.is_graph_input():
                graph.outputs.append(v)
                present.add(v.name)
        if q_in is not None and q_in.name in present:
            pre[key] = q_in.name or ""
    producers = {key: q_nodes[module.sites[key].q_node].inputs[0].producer() for key in pre}  # type: ignore[union-attr]
    names = [v.name or "" for v in graph.outputs]
    session = make_session(clone, level=level)
    feeds = as_feeds(inputs[0] if len(inputs) == 1 else inputs, module.input_names)
    fetched = dict(zip(names, session.run(names, feeds)))
    was = module.training
    module.eval()
    try:
        forced = {s.output: fetched[s.output] for s in module.sites.values()} if teacher_forcing else None
        env = module.capture(*inputs, forced=forced)
    finally:
        module.train(was)
    out: dict[str, CodeParity] = {}
    for key, site in module.sites.items():
        fq = module.fake_quant(key)
        scale = fq.scale.detach().cpu().numpy()
        zp = None if fq.dtype.is_float else fq.zero_point.detach().cpu().numpy().astype(np.int64)
        theirs = numerics.quantize(fetched[site.output], scale, zp, fq.dtype, fq.layout)
        if theirs.dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
            theirs = theirs.astype(np.int32)
        a = _ordinal(np.asarray(theirs).astype(np.float32), fq.dtype)
        b = _ordinal(env[site.codes].cpu().numpy(), fq.dtype)
        diff = np.abs(a - b)
        near = np.zeros(diff.shape, bool)
        if key in pre:
            near = np.broadcast_to(_near_boundary(np.asarray(fetched[pre[key]], np.float32),
                                                  accumulation_length(producers[key]), scale, zp, fq.dtype,
                                                  fq.layout), diff.shape)
        out[key] = CodeParity(key, fq.dtype, site.kind, int(diff.size), int((diff == 0).sum()),
                              int(diff.max()) if diff.size else 0, int(near.sum()), int(((diff != 0) & ~near).sum()))
    if not teacher_forcing:
        _mark_upstream_differences(graph, module, out)
    return out


def _mark_upstream_differences(graph: ir.Graph, module: OnnxModule, out: dict[str, CodeParity]) -> None:
    """Set ``upstream_differs`` on targets fed (through any path) by a target whose codes differ."""
    by_q = {site.q_node: key for key, site in module.sites.items()}
    differing_dq = {site.dq_node for key, site in module.sites.items() if out[key].equal != out[key].total}
    tainted: set[int] = set()
    for node in graph:  # topological order
        hit = any(v is not None and id(v) in tainted for v in node.inputs)
        if node.name in by_q and hit:
            key = by_q[node.name]
            out[key] = dataclasses.replace(out[key], upstream_differs=True)
        if hit or node.name in differing_dq:
            tainted.update(id(v) for v in node.outputs)


def unexplained(parity: dict[str, CodeParity]) -> dict[str, tuple[int, int, int]]:
    """Targets whose inputs agree but whose codes differ away from any rounding boundary:
    key -> (unexplained, near, total). Empty when the mirror matches up to float summation order."""
    return {k: (p.unexplained, p.near, p.total) for k, p in parity.items() if p.unexplained and not p.upstream_differs}


def summarize(parity: dict[str, CodeParity]) -> tuple[float, int, int]:
    """(fraction of identical codes over all elements, total elements, worst distance in steps)."""
    total = sum(p.total for p in parity.values())
    equal = sum(p.equal for p in parity.values())
    worst = max((p.max_steps for p in parity.values()), default=0)
    return (equal / total if total else 1.0), total, worst
