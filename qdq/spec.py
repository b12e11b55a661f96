"""QuantizationSpec and granularities: what one tensor's quantization looks like.

Mirrors coreai_opt's ``QuantizationSpec``: frozen after construction, validated on
construction, strings/dicts/torch dtypes accepted wherever a user would write them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

from qdq.calibration import registry
from qdq.dtypes import QDType, parse_dtype
from qdq.errors import ConfigError

__all__ = [
    "Granularity",
    "PerBlockGranularity",
    "PerChannelGranularity",
    "PerTensorGranularity",
    "QScheme",
    "QuantizationSpec",
    "default_activation_spec",
    "default_weight_spec",
    "parse_granularity",
    "show",
]


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line error messages about any user value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _unknown_keys(data: Mapping[Any, Any], valid: Any) -> list[Any]:
    """Keys of ``data`` that are not valid field names, in their order (any key type)."""
    return [k for k in data if not isinstance(k, str) or k not in valid]


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
    name = getattr(value, "value", value)  # coreai_opt / torch enums carry the name in .value
    if isinstance(name, str):
        for member in QScheme:
            if member.value == name.strip().lower():
                return member
    valid = ", ".join(m.value for m in QScheme)
    raise ConfigError(f"unknown qscheme {show(value)}; use one of: {valid}")


@dataclasses.dataclass(frozen=True)
class PerTensorGranularity:
    """One scale/zero-point for the whole tensor."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_tensor"}


@dataclasses.dataclass(frozen=True)
class PerChannelGranularity:
    """One scale/zero-point per slice along ``axis``; ``None`` = the op's output-channel axis."""

    axis: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", _parse_axis(self.axis, "per_channel"))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_channel", "axis": self.axis}


def _parse_axis(axis: Any, kind: str) -> int | None:
    if axis is None:
        return None
    if not _is_int(axis):
        raise ConfigError(f"{kind} axis must be an integer or null (the op's default axis), got {show(axis)}")
    return int(axis)


@dataclasses.dataclass(frozen=True)
class PerBlockGranularity:
    """Blocks of ``block_size`` along ``axis`` (``None`` = the op's input-channel axis), per channel otherwise."""

    axis: int | None = None
    block_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", _parse_axis(self.axis, "per_block"))
        bs = self.block_size
        if isinstance(bs, (tuple, list)):  # coreai_opt's per-dimension block sizes: exactly one > 1
            if not all(_is_int(b) for b in bs) or len(sizes := [int(b) for b in bs if b not in (-1, 1)]) != 1:
                raise ConfigError(
                    f"per_block block_size {show(bs)} must block exactly one axis; write block_size: 32 and axis: N"
                )
            bs = sizes[0]
        if not _is_int(bs) or bs < 2:
            raise ConfigError(f"per_block block_size must be an integer >= 2, got {show(self.block_size)}")
        object.__setattr__(self, "block_size", int(bs))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_block", "axis": self.axis, "block_size": self.block_size}


Granularity = PerTensorGranularity | PerChannelGranularity | PerBlockGranularity

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
        if not isinstance(kind, str) or kind not in _GRANULARITY_TYPES:
            close = difflib.get_close_matches(kind, _GRANULARITY_TYPES, n=1) if isinstance(kind, str) else []
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown granularity type {show(kind)}{hint}; use one of: {', '.join(_GRANULARITY_TYPES)}"
            )
        cls = _GRANULARITY_TYPES[kind]
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = _unknown_keys(value, fields | {"type"})
        if extra:
            raise ConfigError(
                f"unknown key(s) {show(extra)} in {kind} granularity; valid keys: {sorted(fields | {'type'})}"
            )
        return cls(**{k: v for k, v in value.items() if k != "type"})
    # coreai_opt / pydantic granularity objects: read their fields.
    cls_name = type(value).__name__
    for kind, cls in _GRANULARITY_TYPES.items():
        if cls.__name__ == cls_name:
            kwargs = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls) if hasattr(value, f.name)}
            return cls(**kwargs)
    raise ConfigError(f"cannot read granularity {show(value)}; write e.g. {{'type': 'per_channel', 'axis': 0}}")


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
        kwargs = self.calculator_kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ConfigError(
                f"calculator_kwargs must be a mapping of argument name -> value, e.g. {{averaging_constant: 0.01}}, "
                f"got {show(kwargs)}"
            )
        set_(self, "calculator_kwargs", _FrozenDict(kwargs))
        if not isinstance(self.learnable_scale, bool):
            raise ConfigError(f"learnable_scale must be true or false, got {show(self.learnable_scale)}")
        if kwargs:
            _check_calculator_kwargs(self)

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
            raise ConfigError(f"a QuantizationSpec must be a mapping, got {show(data)}")
        valid = [f.name for f in dataclasses.fields(cls)]
        extra = _unknown_keys(data, valid)
        if extra:
            close = [m for k in extra if isinstance(k, str) for m in difflib.get_close_matches(k, valid, n=1)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown QuantizationSpec key(s) {show(extra)}{hint}; valid keys: {valid}")
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
        raise ConfigError(f"qparam_calculator_cls must be a name or a class, got {show(value)}")
    if isinstance(value, type) and getattr(value, "registered_name", None) is None:
        raise ConfigError(
            f"calculator class {value.__name__} is not registered; decorate it with "
            f"@QParamsCalculatorBase.register('name')"
        )
    if not name.isprintable():
        raise ConfigError(f"unknown qparam_calculator_cls {show(value)}; registered: {', '.join(registry.names())}")
    if name != "default" and registry.get(name) is None:
        close = registry.close_matches(name)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown qparam_calculator_cls '{name}'{hint}; registered: {', '.join(registry.names())} "
                          "(register your own with @QParamsCalculatorBase.register)")
    return name


def _init_arguments(klass: type) -> tuple[set[str], bool]:
    """Keyword arguments the calculator class accepts beyond (spec, layout), and whether that list is final.

    Walks the MRO because calculators pass ``**kwargs`` on to their base; the list is final when
    the chain ends at a base that takes no ``**kwargs`` of its own use (QParamsCalculatorBase).
    """
    names: set[str] = set()
    for base in klass.__mro__:
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self", "spec", "layout"}, True
        if base.__name__ == "QParamsCalculatorBase":  # takes **kwargs only to reject them
            return names - {"self", "spec", "layout"}, True
    return names - {"self", "spec", "layout"}, False


def _check_calculator_kwargs(spec: QuantizationSpec) -> None:
    """Unknown or invalid ``calculator_kwargs`` are config errors now, not failures during calibration.

    ``default`` may become ``static`` (weights) or ``moving_average`` (activations): the kwargs must
    suit one of them. Values are checked by building the calculator once on a per-tensor layout.
    """
    from qdq.layout import QLayout

    name = spec.qparam_calculator_cls
    candidates = ["moving_average", "static"] if name == "default" else [name]
    given = sorted(spec.calculator_kwargs)
    accepted: set[str] = set()
    for candidate in candidates:
        klass = registry.get(candidate)
        if klass is None:
            return
        names, final = _init_arguments(klass)
        accepted |= names
        if final and not set(given) <= names:
            continue
        try:
            klass(spec, QLayout(), **dict(spec.calculator_kwargs))
        except ConfigError:
            raise
        except (TypeError, ValueError, ArithmeticError) as exc:  # a wrong value type, e.g. averaging_constant: [1]
            raise ConfigError(
                f"calculator '{candidate}': invalid calculator_kwargs {show(dict(spec.calculator_kwargs))} "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
            ) from None
        return
    unknown = [k for k in given if k not in accepted]
    close = [m for k in unknown for m in difflib.get_close_matches(k, accepted, n=1)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"calculator '{name}' does not take calculator_kwargs {show(unknown)}{hint}; "
        f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
    )


def _parse_float_range(value: Any) -> tuple[float | None, float | None] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(v is None or _is_number(v) for v in value):
        raise ConfigError(f"float_range must be [min, max] of numbers (either may be null), got {show(value)}")
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
