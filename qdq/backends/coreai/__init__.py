"""The Core AI backend: a prepared QDQ model lowered to a torch program with ``coreai::*`` ops, converted by
coreai-torch to an ``.aimodel`` asset that the Core AI runtime also runs on Linux.

``OPS`` (the ops per Q->DQ site), ``legalize_plan`` / ``legalize`` (what Core AI cannot take, refused before
calibration), ``convert`` / ``save`` (coreai-torch), ``inspect`` (op and weight-dtype counts of a saved asset)
and :class:`CoreAIRuntime` / ``run`` (the Core AI runtime). coreai-torch and coreai-core are the optional extra
``qdq[coreai]``; only ``convert`` / ``save`` / ``inspect`` / ``run`` import them.
"""

from __future__ import annotations

from qdq.backends.coreai.convert import SUFFIX, convert, save
from qdq.backends.coreai.inspect_asset import inspect
from qdq.backends.coreai.legalize import legalize, legalize_plan
from qdq.backends.coreai.ops import OPS, CoreAIOps
from qdq.backends.coreai.runtime import CoreAIRuntime, run

__all__ = ["OPS", "SUFFIX", "CoreAIOps", "CoreAIRuntime", "convert", "inspect", "legalize", "legalize_plan", "run",
           "save"]
