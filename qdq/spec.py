"""QuantizationSpec and granularities: what one tensor's quantization looks like.

Mirrors coreai_opt's ``QuantizationSpec``: frozen after construction, validated on
construction, strings/dicts/torch dtypes accepted wherever a user would write them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, Union

from qdq.dtypes import QDType, parse_dtype
from qdq.errors import ConfigError

__all__ = [
    "QScheme",
    "PerTensorGranularity",
    "PerChannelGranularity",
    "PerBlockGranularity",
    "Granularity",
    "QuantizationSpec",
    "parse_granularity",
    "default_weight_spec",
    "default_activation_spec",
]


class QScheme(enum.Enum):
    """How the float range maps to the integer grid (coreai_opt conventions)."""

    SYMMETRIC = "symmetric"
    SYMMETRIC_WITH_CLIPPING = "symmetric_with_clipping"
    ASYMMETRIC = "asymmetric"

    def __str__(self) -> str:
        return self.value


def _parse_qscheme(value: Any) -> QScheme:
    if isinstance(value, QScheme):
        return value
    name = str(getattr(value, "value", value)).strip().lower()
    for member in QScheme:
        if member.value == name:
            return member
    valid = ", ".join(m.value for m in QScheme)
    raise ConfigError(f"unknown qscheme {value!r}; use one of: {valid}")


@dataclasses.dataclass(frozen=True)
class PerTensorGranularity:
    """One scale/zero-point for the whole tensor."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_tensor"}


@dataclasses.dataclass(frozen=True)
class PerChannelGranularity:
    """One scale/zero-point per slice along ``axis``; ``None`` = the op's output-channel axis."""

    axis: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_channel", "axis": self.axis}


@dataclasses.dataclass(frozen=True)
class PerBlockGranularity:
    """Blocks of ``block_size`` along ``axis`` (``None`` = the op's input-channel axis), per channel otherwise."""

    axis: int | None = None
    block_size: int = 32

    def __post_init__(self) -> None:
        bs = self.block_size
        if isinstance(bs, (tuple, list)):
            sizes = [int(b) for b in bs if int(b) not in (-1, 1)]
            if len(sizes) != 1:
                raise ConfigError(
                    f"per_block block_size {bs!r} must block exactly one axis; write block_size: 32 and axis: N"
                )
            object.__setattr__(self, "block_size", sizes[0])
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ConfigError(f"per_block block_size must be an integer >= 2, got {self.block_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_block", "axis": self.axis, "block_size": self.block_size}


Granularity = Union[PerTensorGranularity, PerChannelGranularity, PerBlockGranularity]

_GRANULARITY_TYPES: dict[str, type] = {
    "per_tensor": PerTensorGranularity,
    "per_channel": PerChannelGranularity,
    "per_block": PerBlockGranularity,
}


def parse_granularity(value: Any) -> Granularity:
    """Accept a granularity object, ``"per_channel"``, or ``{"type": "per_channel", "axis": 0}``."""
    if isinstance(value, (PerTensorGranularity, PerChannelGranularity, PerBlockGranularity)):
        return value
    if isinstance(value, str):
        value = {"type": value}
    if isinstance(value, Mapping):
        kind = value.get("type")
        if kind not in _GRANULARITY_TYPES:
            raise ConfigError(
                f"unknown granularity type {kind!r}; use one of: {', '.join(_GRANULARITY_TYPES)}"
            )
        cls = _GRANULARITY_TYPES[kind]
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = set(value) - fields - {"type"}
        if extra:
            raise ConfigError(
                f"unknown key(s) {sorted(extra)} in {kind} granularity; valid keys: {sorted(fields | {'type'})}"
            )
        return cls(**{k: v for k, v in value.items() if k != "type"})
    # coreai_opt / pydantic granularity objects: read their fields.
    cls_name = type(value).__name__
    for kind, cls in _GRANULARITY_TYPES.items():
        if cls.__name__ == cls_name:
            kwargs = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls) if hasattr(value, f.name)}
            return cls(**kwargs)
    raise ConfigError(f"cannot read granularity {value!r}; write e.g. {{'type': 'per_channel', 'axis': 0}}")


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
    """How to quantize one tensor.

    Args:
        dtype: ``int8`` (default), ``uint8``, ``int16``, ``uint16``, ``int4``, ``uint4``,
            ``float8_e4m3fn``, ``float8_e5m2`` (names or torch dtypes).
        qscheme: ``symmetric`` (default), ``symmetric_with_clipping`` or ``asymmetric``
            (float8: symmetric only).
        granularity: per-tensor (default), per-channel or per-block.
        qparam_calculator_cls: a registered calculator name (``static``, ``moving_average``,
            ``global_minmax``, ... or a user one) or class; ``"default"`` = ``static`` for
            weights and ``moving_average`` for activations.
        float_range: ``(min, max)`` pinning either or both ends of the range (min <= 0 <= max).
        calculator_kwargs: extra constructor arguments of the calculator,
            e.g. ``{"averaging_constant": 0.05}``.
        learnable_scale: learn the scale during QAT (LSQ); ignored by PTQ.
    """

    dtype: Any = QDType.INT8
    qscheme: Any = QScheme.SYMMETRIC
    granularity: Any = dataclasses.field(default_factory=PerTensorGranularity)
    qparam_calculator_cls: Any = "default"
    float_range: Any = None
    calculator_kwargs: Any = dataclasses.field(default_factory=dict)
    learnable_scale: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "dtype", parse_dtype(self.dtype))
        set_(self, "qscheme", _parse_qscheme(self.qscheme))
        set_(self, "granularity", parse_granularity(self.granularity))
        if self.dtype.is_float and self.qscheme is not QScheme.SYMMETRIC:
            raise ConfigError(
                f"dtype {self.dtype} supports only qscheme 'symmetric', got '{self.qscheme}'; "
                "set qscheme: symmetric or use an integer dtype"
            )
        set_(self, "qparam_calculator_cls", _calculator_name(self.qparam_calculator_cls))
        set_(self, "float_range", _parse_float_range(self.float_range))
        if not isinstance(self.calculator_kwargs, Mapping):
            raise ConfigError("calculator_kwargs must be a mapping, e.g. {averaging_constant: 0.01}")
        set_(self, "calculator_kwargs", _FrozenDict(self.calculator_kwargs))
        set_(self, "learnable_scale", bool(self.learnable_scale))

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> QuantizationSpec:
        """A copy with some fields changed (specs are immutable)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dtype": self.dtype.value,
            "qscheme": self.qscheme.value,
            "granularity": self.granularity.to_dict(),
            "qparam_calculator_cls": self.qparam_calculator_cls,
        }
        if self.float_range is not None:
            out["float_range"] = list(self.float_range)
        if self.calculator_kwargs:
            out["calculator_kwargs"] = dict(self.calculator_kwargs)
        if self.learnable_scale:
            out["learnable_scale"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantizationSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a QuantizationSpec must be a mapping, got {data!r}")
        valid = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - valid
        if extra:
            raise ConfigError(
                f"unknown QuantizationSpec key(s) {sorted(extra)}; valid keys: {sorted(valid)}"
            )
        return cls(**dict(data))


class _FrozenDict(dict):  # type: ignore[type-arg]
    """A hashable, read-only dict so specs stay hashable."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

    def _readonly(self, *a: Any, **k: Any) -> None:
        raise TypeError("QuantizationSpec.calculator_kwargs is read-only; use spec.replace(...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


def _calculator_name(value: Any) -> str:
    if isinstance(value, str):
        name = value.strip()
    elif isinstance(value, type):
        name = getattr(value, "registered_name", None) or value.__name__
    else:
        raise ConfigError(f"qparam_calculator_cls must be a name or a class, got {value!r}")
    from qdq.calibration.base import QParamsCalculatorBase  # registry; import late (cycle)

    if isinstance(value, type) and getattr(value, "registered_name", None) is None:
        raise ConfigError(
            f"calculator class {value.__name__} is not registered; decorate it with "
            f"@QParamsCalculatorBase.register('name')"
        )
    QParamsCalculatorBase.check_name(name)
    return name


def _parse_float_range(value: Any) -> tuple[float | None, float | None] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"float_range must be [min, max] (either may be null), got {value!r}")
    lo, hi = (None if v is None else float(v) for v in value)
    if lo is None and hi is None:
        return None
    if lo is not None and (lo > 0 or not math.isfinite(lo)):
        raise ConfigError(f"float_range min must be a finite number <= 0, got {lo}")
    if hi is not None and (hi < 0 or not math.isfinite(hi)):
        raise ConfigError(f"float_range max must be a finite number >= 0, got {hi}")
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"float_range min must be < max, got [{lo}, {hi}]")
    return (lo, hi)


def default_weight_spec() -> QuantizationSpec:
    """int8, symmetric, per-channel (the op's output-channel axis), ``static``."""
    return QuantizationSpec(granularity=PerChannelGranularity())


def default_activation_spec() -> QuantizationSpec:
    """int8, symmetric, per-tensor, ``default`` (= ``moving_average`` for activations)."""
    return QuantizationSpec()
