"""What onnxruntime's CPU graph optimizer makes of a model: op counts of the optimized graph.

Used by tests and benchmarks to check that a finalized QDQ model runs integer kernels
(QLinearConv, QLinearAdd, QGemm, ...) and to name the compute ops that stayed float.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from qdq.model_io import to_proto

__all__ = ["FLOAT_COMPUTE_OPS", "INTEGER_OPS", "float_compute_nodes", "optimized_model", "optimized_op_counts"]

logger = logging.getLogger(__name__)

#: Compute ops that, left in an optimized graph, run in float.
FLOAT_COMPUTE_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul"})

#: onnxruntime's integer kernels produced by its QDQ fusions.
INTEGER_OPS: frozenset[str] = frozenset({
    "QLinearConv", "QLinearAdd", "QLinearMul", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
    "MatMulNBits",
})


def optimized_model(model: Any, *, level: str = "all") -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs after its optimizations (``level``: all / extended / basic)."""
    import onnxruntime as ort

    from qdq.session import DEFAULT_PROVIDERS, session_options

    opts = session_options(level)  # the session module's options; only the optimized-graph dump is added here
    with tempfile.TemporaryDirectory(prefix="qdq_ort_") as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(to_proto(model).SerializeToString(), opts, providers=list(DEFAULT_PROVIDERS))
        return onnx.load(str(out))


def optimized_op_counts(model: Any, *, level: str = "all") -> Counter[str]:
    """Op-type counts of onnxruntime's optimized graph of ``model`` (path, ModelProto or onnx_ir.Model)."""
    return Counter(n.op_type for n in optimized_model(model, level=level).graph.node)


def float_compute_nodes(model: Any, *, level: str = "all") -> list[tuple[str, str]]:
    """(name, op type) of the compute nodes (Conv, Gemm, MatMul, Add, ...) onnxruntime still runs in float."""
    graph = optimized_model(model, level=level).graph
    return [(n.name, n.op_type) for n in graph.node if n.op_type in FLOAT_COMPUTE_OPS and n.domain in ("", "ai.onnx")]
