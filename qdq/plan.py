"""The quantization plan: which tensors get a QDQ pair, with which spec, for which consumers.

The annotate pass decides (writes a :class:`QuantPlan`); the insert pass materialises it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from qdq.layout import QLayout
from qdq.spec import QuantizationSpec

__all__ = ["ALL_USES", "QuantPlan", "QuantTarget", "TargetKind"]

TargetKind = Literal["weight", "activation", "constant"]

#: ``QuantTarget.uses`` value meaning every consumer of the tensor (and the graph output).
ALL_USES = None


@dataclasses.dataclass
class QuantTarget:
    """One QDQ pair.

    ``uses`` lists the (node name, input index) pairs that read the dequantized value, or
    ``None`` for every consumer. ``shared_with`` names the target whose qparams this one
    reuses (pass-through ops); such a target has no calculator of its own.
    """

    key: str
    tensor: str
    spec: QuantizationSpec
    layout: QLayout
    kind: TargetKind
    uses: list[tuple[str, int]] | None = ALL_USES
    shared_with: str | None = None
    ops: list[str] = dataclasses.field(default_factory=list)  # node names that asked for it (reports)

    @property
    def observed(self) -> bool:
        """True for activations with their own calculator (fed by calibration batches)."""
        return self.kind == "activation" and self.shared_with is None


@dataclasses.dataclass
class QuantPlan:
    """All targets, keyed by ``QuantTarget.key`` (insertion order = graph order)."""

    targets: dict[str, QuantTarget] = dataclasses.field(default_factory=dict)

    def root(self, key: str) -> str:
        """The key whose qparams ``key`` uses (follows pass-through sharing)."""
        seen = 0
        while (shared := self.targets[key].shared_with) is not None:
            key = shared
            seen += 1
            if seen > len(self.targets):
                raise RuntimeError("cycle in qparam sharing")
        return key

    def by_kind(self, kind: TargetKind) -> list[QuantTarget]:
        return [t for t in self.targets.values() if t.kind == kind]

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.targets.values():
            out[t.kind] = out.get(t.kind, 0) + 1
        return out
