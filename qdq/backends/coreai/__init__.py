"""The Core AI backend: a prepared QDQ model lowered to a torch program with ``coreai::*`` ops, converted by
coreai-torch to an ``.aimodel`` asset that the Core AI runtime also runs on Linux.

``OPS`` (the ops per Q->DQ site), ``legalize`` (what Core AI cannot take, refused before calibration),
``convert`` / ``save`` (coreai-torch), ``inspect`` (op and weight-dtype counts of a saved asset) and
``run`` (the Core AI runtime). coreai-torch and coreai-core are the optional extra ``qdq[coreai]``.
"""

from __future__ import annotations

from qdq.backends.coreai.ops import OPS, CoreAIOps

__all__ = ["OPS", "CoreAIOps"]
