"""Element types of values the model file leaves untyped.

The legacy torch exporter (and hand-written graphs) often give no type to intermediate values: a ``Constant``
feeding slice-index arithmetic, a ``Shape -> Gather -> Div -> Mul`` chain. Planning treats an untyped value as
float, so such int64 index math would get QuantizeLinear nodes that onnxruntime refuses to load. This fills
the missing element types from onnx's type inference (run on a copy without large weights) and touches
nothing else: shapes and values already typed stay as the file has them.
"""

from __future__ import annotations

import functools
import logging

import onnx
import onnx_ir as ir

__all__ = ["fill_missing_dtypes"]

logger = logging.getLogger(__name__)


def _untyped(graph: ir.Graph) -> dict[str, ir.Value]:
    """Untyped node outputs of ``graph`` and its subgraphs, by name."""
    found: dict[str, ir.Value] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for out in node.outputs:
            if out.dtype is None and out.name:
                found[out.name] = out
    return found


def fill_missing_dtypes(model: ir.Model) -> int:
    """Set the element type of every untyped node output onnx can infer; returns how many were set.

    Inference failing (an unknown custom op, an inconsistent graph) leaves the model as it was."""
    untyped = _untyped(model.graph)
    if not untyped:
        return 0
    infer = functools.partial(onnx.shape_inference.infer_shapes, check_type=False, strict_mode=False,
                              data_prop=False)
    try:
        from onnx_ir.passes.common import _c_api_utils  # strips large initializers around onnx's C API

        inferred = _c_api_utils.call_onnx_api(infer, model)
    except Exception as exc:  # noqa: BLE001 - inference is a best effort; planning copes with untyped values
        logger.debug("type inference failed (%s); untyped values are planned as float", exc)
        return 0
    types: dict[str, int] = {}
    graphs = [inferred.graph]
    while graphs:
        g = graphs.pop()
        for info in (*g.value_info, *g.output):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types[info.name] = info.type.tensor_type.elem_type
        for node in g.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    filled = 0
    for name, value in untyped.items():
        if name in types:
            value.dtype = ir.DataType(types[name])
            filled += 1
    return filled
