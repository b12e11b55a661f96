"""Algorithm passes: registered, configurable units that edit the float model from calibration statistics.

An algorithm runs between planning and QDQ insertion (the config's ``algorithms`` list, in order; YAML
``algorithms: [{name: smoothquant, alpha: 0.7}]``; CLI ``--algorithm smoothquant:alpha=0.7``). It gets the float
model and a way to stream calibration batches through it, edits the model (weights, inserted ops) and returns
notes; the quantizer then re-plans on the edited model. Register your own with :func:`register_algorithm`.

| name          | what it does                                                                       |
|---------------|------------------------------------------------------------------------------------|
| `smoothquant` | moves activation outliers into the weights of the MatMul/Gemm reading them (Xiao et al. 2023) |
| `gptq`        | rounds MatMul/Gemm/Conv weights column by column, compensating each rounding error with the layer's input Hessian (Frantar et al. 2023) |
| `adaround`    | learns each weight's rounding direction against the layer's output reconstruction error (Nagel et al. 2020) |
| `cle`         | equalizes the per-channel weight ranges of consecutive Conv pairs through ReLU (Nagel et al. 2019) |
| `sequential_bias_correction` | after calibration, layer by layer: moves each quantized layer's bias so its per-channel output mean matches the float model's |

Most algorithms run before calibration (``stage = "float"``). One with ``stage = "calibrated"`` (sequential bias
correction) needs the activation ranges: it runs after calibration (:meth:`Quantizer.apply_calibrated_algorithms`;
``qdq.quantize`` and the CLI call it), with ``context.quantized`` (the fake-quantized model at the current
qparams, a copy it may edit) and ``context.reference`` (the float model before any rounding) to measure against.

An algorithm that needs to know how weights will be quantized reads ``context.plan`` (the current plan of the
model it edits); one that fixes a weight's grid itself records it in ``context.pinned`` (tensor name ->
:class:`~qdq.calibration.pinned.PinnedQParams`), and the quantizer uses those qparams for that weight.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

from qdq.errors import ConfigError

if TYPE_CHECKING:
    from qdq.calibration.pinned import PinnedQParams
    from qdq.plan import QuantPlan

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmContext", "build_algorithm", "parse_algorithm", "register_algorithm"]

ALGORITHMS: dict[str, type[Algorithm]] = {}

Batches = Callable[[], Iterable[Mapping[str, Any]]]


@dataclasses.dataclass
class AlgorithmContext:
    """What the quantizer tells an algorithm: the plan of the model it edits, and where to pin weight qparams."""

    plan: QuantPlan
    pinned: dict[str, PinnedQParams] = dataclasses.field(default_factory=dict)
    progress: bool = True
    #: weight name -> {initializer: value before rounding} (the weight and the bias its correction moved): a
    #: layer a fallback leaves float gets its original values back (``Quantizer.replan``)
    rounded: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: calibrated-stage algorithms only: the fake-quantized model of the current float model, and the float model
    #: as before rounding (what the quantized model should compute)
    quantized: ir.Model | None = None
    reference: ir.Model | None = None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return bool(value)


class Algorithm:
    """Base class: ``OPTIONS`` maps option name -> (type, default); ``apply`` edits the model in place."""

    name: ClassVar[str] = ""
    #: "float": runs on the float model before calibration; "calibrated": after it (needs activation ranges)
    stage: ClassVar[str] = "float"
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ConfigError(f"algorithm {self.name!r}: unknown option(s) {unknown}; "
                              f"valid: {sorted(self.OPTIONS) or 'none'}")
        self.options: dict[str, Any] = {}
        for key, (kind, default) in self.OPTIONS.items():
            value = options.get(key, default)
            try:
                value = _as_bool(value) if kind is bool else kind(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"algorithm {self.name!r}: option {key} must be {kind.__name__}, "
                                  f"got {value!r}") from exc
            self.options[key] = value
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for option values out of range."""

    def applies_to(self, model: ir.Model) -> bool:
        """Whether :meth:`apply` would change ``model`` (default: yes)."""
        return True

    def apply(self, model: ir.Model, batches: Batches, context: AlgorithmContext | None = None) -> list[str]:
        """Edit ``model`` (a float model) in place; ``batches()`` streams calibration feeds; ``context`` is given
        by the quantizer (plan, pinned qparams). Returns notes."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make an :class:`Algorithm` available by ``name`` in configs and on the CLI."""
    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls
    return deco


def build_algorithm(spec: Any) -> Algorithm:
    """An :class:`Algorithm` from ``{"name": ..., **options}``, ``"name"``, ``"name:k=v,..."`` or an instance."""
    _load_builtins()
    if isinstance(spec, Algorithm):
        return spec
    if isinstance(spec, str):
        return parse_algorithm(spec)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"an algorithm is a mapping with a 'name' (e.g. {{name: smoothquant, alpha: 0.7}}), "
                          f"got {spec!r}")
    name = spec["name"]
    cls = ALGORITHMS.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(ALGORITHMS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown algorithm {name!r}{hint}; known: {sorted(ALGORITHMS)}")
    return cls(**{k: v for k, v in spec.items() if k != "name"})


def parse_algorithm(text: str) -> Algorithm:
    """``"smoothquant"`` or ``"smoothquant:alpha=0.7,targets=all"`` (the CLI's ``--algorithm``)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--algorithm {text!r}: options are key=value, got {item!r}")
        options[key.strip()] = value.strip()
    return build_algorithm({"name": name.strip(), **options})


def _load_builtins() -> None:
    from qdq.algorithms import adaround, cle, gptq, sequential_bias, smoothquant  # noqa: F401  (register themselves)
