"""Numerical parity between the torch mirror and onnxruntime: integer codes at every quantized tensor.

:func:`code_parity` runs the exported QDQ model in onnxruntime with every DQ output fetched, runs
the mirror (eval mode) on the same inputs, and compares the codes ``QuantizeLinear`` produces at
each target. onnxruntime cannot hand int4 tensors to numpy, so its codes are recovered from the
DQ outputs with the reference numerics (exact: ``(q - zp) * s / s`` rounds back to ``q``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

from qdq import numerics
from qdq.calibration.runner import as_feeds, make_session
from qdq.dtypes import QDType
from qdq.model_io import load_model
from qdq.qat.onnx_module import OnnxModule

__all__ = ["CodeParity", "code_parity", "summarize"]


@dataclasses.dataclass(frozen=True)
class CodeParity:
    """Agreement of one target's codes: ``equal`` of ``total`` identical, ``max_steps`` apart at worst."""

    key: str
    dtype: QDType
    kind: str
    total: int
    equal: int
    max_steps: int

    @property
    def fraction(self) -> float:
        return self.equal / self.total if self.total else 1.0


def _ordinal(codes: np.ndarray, dtype: QDType) -> np.ndarray:
    """Codes as integers where neighbouring representable values differ by 1 (float8 included)."""
    if not dtype.is_float:
        return np.asarray(codes, np.float64).astype(np.int64)
    bits = np.asarray(codes, np.float32).astype(dtype.np_dtype).view(np.uint8).astype(np.int64)
    return np.where(bits & 0x80, -(bits & 0x7F), bits)


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
    for site in module.sites.values():
        if site.output not in present:
            graph.outputs.append(values[site.output])
            present.add(site.output)
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
        out[key] = CodeParity(key, fq.dtype, site.kind, int(diff.size), int((diff == 0).sum()),
                              int(diff.max()) if diff.size else 0)
    return out


def summarize(parity: dict[str, CodeParity]) -> tuple[float, int, int]:
    """(fraction of identical codes over all elements, total elements, worst distance in steps)."""
    total = sum(p.total for p in parity.values())
    equal = sum(p.equal for p in parity.values())
    worst = max((p.max_steps for p in parity.values()), default=0)
    return (equal / total if total else 1.0), total, worst
