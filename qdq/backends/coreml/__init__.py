"""The Core ML backend: legalization, torch ops for the lowering, coremltools conversion, ``.mlpackage`` save/inspect.

``OPS`` needs torch only; ``convert`` / ``save`` / ``inspect`` need coremltools (``pip install 'qdq[coreml]'``).
"""

from __future__ import annotations

from qdq.backends.coreml.convert import convert, save
from qdq.backends.coreml.inspect_package import inspect
from qdq.backends.coreml.legalize import legalize, legalize_plan
from qdq.backends.coreml.ops import OPS, CoreMLOps

__all__ = ["OPS", "CoreMLOps", "convert", "inspect", "legalize", "legalize_plan", "save"]
