"""QATSchedule: when observers run, fake quantization applies and batch norm freezes (coremltools milestones).

Read from ``QuantizerConfig.qat_schedule`` (YAML)::

    qat_schedule:
      enable_observer: 0        # step at which observers start updating qparams
      enable_fake_quant: 100    # step at which fake quantization turns on
      disable_observer: 400     # step at which observers freeze (null = never)
      freeze_bn: 200            # step at which batch norm uses inference statistics (null = never)
      learnable_scale: weights  # LSQ for: true/all, weights, activations, false (default: each spec decides)

or coremltools' ``milestones: [enable_observer, enable_fake_quant, disable_observer, freeze_bn]``.
``QATQuantizer.step()`` advances the step counter (call it once per optimizer step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qdq.errors import ConfigError

__all__ = ["QATSchedule"]

_MILESTONES = ("enable_observer", "enable_fake_quant", "disable_observer", "freeze_bn")
_LEARNABLE = (True, False, "all", "weights", "activations")


def _step(value: Any, key: str, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        hint = " or null (never)" if optional else ""
        raise ConfigError(f"qat_schedule.{key} must be a step number >= 0{hint}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class QATSchedule:
    """Milestones (optimizer steps) of quantization-aware training.

    Defaults: observers and fake quantization on from step 0, never frozen; batch norm never
    frozen (the exported graph has BN folded into Conv, so this only affects BatchNormalization
    nodes the exporter could not fold). Learnable scales (LSQ) stop being observed once fake
    quantization is on: the observer initializes them, training takes over.
    """

    enable_observer: int = 0
    enable_fake_quant: int = 0
    disable_observer: int | None = None
    freeze_bn: int | None = None
    learnable_scale: bool | str | None = None

    def __post_init__(self) -> None:
        _step(self.enable_observer, "enable_observer", False)
        _step(self.enable_fake_quant, "enable_fake_quant", False)
        _step(self.disable_observer, "disable_observer", True)
        _step(self.freeze_bn, "freeze_bn", True)
        if self.learnable_scale is not None and self.learnable_scale not in _LEARNABLE:
            raise ConfigError(
                f"qat_schedule.learnable_scale must be one of true, false, all, weights, activations; "
                f"got {self.learnable_scale!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QATSchedule:
        """Parse the ``qat_schedule`` mapping (unknown keys are an error)."""
        if data is None:
            return cls()
        if isinstance(data, QATSchedule):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"qat_schedule must be a mapping, e.g. {{enable_fake_quant: 100}}, got {data!r}")
        valid = (*_MILESTONES, "milestones", "learnable_scale")
        extra = [k for k in data if k not in valid]
        if extra:
            raise ConfigError(f"unknown qat_schedule key(s) {extra}; valid keys: {list(valid)}")
        kwargs = {k: v for k, v in data.items() if k != "milestones"}
        if "milestones" in data:
            ms = data["milestones"]
            clash = [k for k in _MILESTONES if k in data]
            if clash:
                raise ConfigError(f"qat_schedule: give either milestones or {clash}, not both")
            if not isinstance(ms, (list, tuple)) or len(ms) != 4:
                raise ConfigError(
                    "qat_schedule.milestones must list 4 steps: [enable_observer, enable_fake_quant, "
                    f"disable_observer, freeze_bn] (as coremltools), got {ms!r}"
                )
            kwargs.update(dict(zip(_MILESTONES, ms)))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _MILESTONES}
        if self.learnable_scale is not None:
            out["learnable_scale"] = self.learnable_scale
        return out

    # ------------------------------------------------------------------ state at a step
    def observers_on(self, step: int) -> bool:
        return step >= self.enable_observer and (self.disable_observer is None or step < self.disable_observer)

    def fake_quant_on(self, step: int) -> bool:
        return step >= self.enable_fake_quant

    def bn_frozen(self, step: int) -> bool:
        return self.freeze_bn is not None and step >= self.freeze_bn
