"""Export backends: capability tables (data) plus the passes that legalize QDQ for each.

``ExportBackend.ONNXRuntime`` / ``.CoreML`` / ``.CoreAI``; :func:`check_capabilities` rejects a
plan a backend cannot run with one line naming the offending tensors and the fix.
"""

from __future__ import annotations

from qdq.backends.capabilities import CAPABILITIES, BackendCapabilities, ExportBackend, check_capabilities

__all__ = ["CAPABILITIES", "BackendCapabilities", "ExportBackend", "check_capabilities"]
