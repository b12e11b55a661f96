"""Strip metadata a deployed model does not need.

Keeps the ``qdq.*`` metadata of activation QuantizeLinear nodes (target, tensor, spec: how a
finalized model maps back to its config) and drops ``qdq.*`` keys anywhere else. With
``drop_export_debug_info`` (default) it also drops the exporters' debugging metadata
(``pkg.torch.*`` stack traces and FX nodes, ``namespace``, ``pkg.onnxscript.*``) from nodes,
initializers and the graph: it describes the float training graph, not the deployed one.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping

import onnx_ir as ir

from qdq.passes._qdq_nodes import is_q, q_kind

__all__ = ["EXPORT_DEBUG_PREFIXES", "StripMetadataPass", "strip_metadata"]

logger = logging.getLogger(__name__)

#: Metadata keys (prefixes) written by torch.onnx / onnxscript for debugging.
EXPORT_DEBUG_PREFIXES: tuple[str, ...] = ("pkg.torch.", "pkg.onnxscript.", "namespace")


def _drop(props: MutableMapping[str, str], prefixes: tuple[str, ...]) -> int:
    keys = [k for k in props if k.startswith(prefixes)] if prefixes else []
    for k in keys:
        del props[k]
    return len(keys)


def strip_metadata(model: ir.Model, *, drop_export_debug_info: bool = True) -> int:
    """Drop unneeded metadata from ``model`` in place; returns the number of keys removed."""
    debug = EXPORT_DEBUG_PREFIXES if drop_export_debug_info else ()
    graph = model.graph
    removed = 0
    for node in graph:
        keep_qdq = is_q(node) and q_kind(node) == "activation"
        prefixes = debug if keep_qdq else ("qdq.", *debug)
        removed += _drop(node.metadata_props, prefixes)
    if debug:
        for value in graph.initializers.values():
            removed += _drop(value.metadata_props, debug)
        for value in (*graph.inputs, *graph.outputs):
            removed += _drop(value.metadata_props, debug)
        removed += _drop(graph.metadata_props, debug)
        removed += _drop(model.metadata_props, debug)
    if removed:
        logger.debug("removed %d metadata entries", removed)
    return removed


class StripMetadataPass(ir.passes.InPlacePass):
    """Keep qdq metadata on activation Q nodes only; optionally drop exporter debugging metadata."""

    def __init__(self, *, drop_export_debug_info: bool = True) -> None:
        super().__init__()
        self.drop_export_debug_info = drop_export_debug_info

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = strip_metadata(model, drop_export_debug_info=self.drop_export_debug_info)
        return ir.passes.PassResult(model, modified=removed > 0)
