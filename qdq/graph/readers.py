"""Who reads a value: the one-reader check passes and algorithms use before they fuse or rescale across an edge."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["sole_reader"]


def sole_reader(value: ir.Value) -> ir.Node | None:
    """The node that is ``value``'s only reader (``value`` not a graph output), else None."""
    if value.is_graph_output():
        return None
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None
