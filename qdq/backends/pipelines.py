"""The finalize pass list of each backend."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from qdq.backends.capabilities import ExportBackend

__all__ = ["finalize_passes"]


def finalize_passes(backend: ExportBackend) -> list[Callable[[ir.Model], object]]:
    """Passes (callables on an ``onnx_ir.Model``, in place) that legalize a prepared QDQ model."""
    return []
