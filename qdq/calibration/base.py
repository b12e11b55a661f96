"""QParamsCalculatorBase: the calculator interface; ``register`` puts a class in :mod:`qdq.calibration.registry`.

A calculator sees one tensor per batch (``observe``) and keeps running statistics only,
so its memory does not grow with the number of calibration samples. ``qparams()``
turns the statistics into scale/zero-point with :func:`qdq.qparams.compute_qparams`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

from qdq.calibration import registry
from qdq.errors import ConfigError, DataError
from qdq.layout import QLayout, reduce_minmax
from qdq.qparams import QParams, compute_qparams
from qdq.spec import QuantizationSpec

__all__ = ["GraphReduction", "QParamsCalculatorBase", "RangeCalculatorBase"]

logger = logging.getLogger(__name__)

_C = TypeVar("_C", bound=type)

#: What a calculator needs of a tensor when that is a reduction onnxruntime can compute for it:
#: ``("minmax", axis)`` or ``("sum", axis)``, ``axis`` None for the whole tensor (see
#: :meth:`QParamsCalculatorBase.graph_reduction`).
GraphReduction = tuple[str, int | None]


class QParamsCalculatorBase(ABC):
    """Base of all calculators. Subclass, implement ``observe``/``compute_range``, register by name.

    Example::

        @QParamsCalculatorBase.register("p99")
        class P99(RangeCalculatorBase): ...
    """

    registered_name: ClassVar[str | None] = None

    def __init__(self, spec: QuantizationSpec, layout: QLayout, **kwargs: Any) -> None:
        if kwargs:
            raise ConfigError(
                f"calculator '{self.registered_name}' does not take {sorted(kwargs)}; "
                "remove them from calculator_kwargs"
            )
        self.spec = spec
        self.layout = layout
        self.num_batches = 0

    # ------------------------------------------------------------------ registry
    @classmethod
    def register(cls, name: str) -> Callable[[_C], _C]:
        """Class decorator: make a calculator usable as ``qparam_calculator_cls=name`` (Python and YAML).

        A name already taken by a different class is a ConfigError."""
        if not isinstance(name, str) or not name or name == "default":
            raise ConfigError(f"calculator name must be a non-empty string other than 'default', got {name!r}")

        def deco(klass: _C) -> _C:
            if not (isinstance(klass, type) and issubclass(klass, QParamsCalculatorBase)):
                raise ConfigError(f"{klass!r} must subclass QParamsCalculatorBase to be registered")
            try:
                registry.add(name, klass)
            except registry.DuplicateCalculatorError as exc:
                raise ConfigError(str(exc)) from None
            klass.registered_name = name
            return klass

        return deco

    @classmethod
    def names(cls) -> list[str]:
        return registry.names()

    @classmethod
    def check_name(cls, name: str) -> None:
        """Raise a ConfigError naming close matches when ``name`` is not registered."""
        if name == "default":
            return
        if registry.get(name) is None:
            close = registry.close_matches(name)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown qparam_calculator_cls '{name}'{hint}; registered: {', '.join(registry.names())} "
                "(register your own with @QParamsCalculatorBase.register)"
            )

    @classmethod
    def create(cls, spec: QuantizationSpec, layout: QLayout, *, is_weight: bool) -> QParamsCalculatorBase:
        """Instantiate the spec's calculator; ``"default"`` is static for weights, moving_average otherwise."""
        name = spec.qparam_calculator_cls
        if name == "default":
            name = "static" if is_weight else "moving_average"
        cls.check_name(name)
        klass = registry.get(name)
        assert klass is not None
        calc: QParamsCalculatorBase = klass(spec, layout, **dict(spec.calculator_kwargs))
        return calc

    # ------------------------------------------------------------------ interface
    #: True when a batch may be fed in pieces (``observe_chunk`` ... ``end_batch``) with the same
    #: result as one ``observe``; the runner then bounds memory by running micro-batches.
    supports_chunks: ClassVar[bool] = False

    @abstractmethod
    def observe(self, x: np.ndarray) -> None:
        """Update running statistics with one batch of the tensor."""

    def observe_chunk(self, x: np.ndarray) -> None:
        """Feed part of a batch (only called when ``supports_chunks``)."""
        raise NotImplementedError

    def end_batch(self) -> None:
        """Close a batch fed with ``observe_chunk`` (or ``observe_reduced``)."""

    def graph_reduction(self) -> GraphReduction | None:
        """The reduction that is all this calculator needs of a tensor, or None when it needs the tensor.

        ``("minmax", axis)``: per-unit min and max (``axis`` None: of the whole tensor; else one
        pair per index along ``axis``). ``("sum", axis)``: per-index sums along ``axis``. The
        calibration runner then computes the reduction inside onnxruntime (ReduceMin/ReduceMax/
        ReduceSum nodes after the producer) and calls :meth:`observe_reduced` once per chunk:
        the tensor itself never leaves the session, so it is neither copied nor kept.
        """
        return None

    def observe_reduced(self, values: tuple[np.ndarray, ...], count: int) -> None:
        """Feed one chunk's :meth:`graph_reduction` results (``count``: elements per reduced unit).

        For ``minmax`` ``values`` is ``(min, max)``, for ``sum`` it is ``(sums,)``. Close the batch
        with ``end_batch`` as for ``observe_chunk``.
        """
        raise NotImplementedError(f"{type(self).__name__} declares a graph_reduction but not observe_reduced")

    @abstractmethod
    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        """The float range [min, max] to quantize, shaped like the scale."""

    @property
    def has_data(self) -> bool:
        return self.num_batches > 0

    def qparams(self) -> QParams:
        if not self.has_data:
            raise DataError(
                f"calculator '{self.registered_name}' has seen no data; run calibration batches first"
            )
        lo, hi = self.compute_range()
        return compute_qparams(self.spec, lo, hi)

    @staticmethod
    def _check_finite(x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            raise DataError("NaN or Inf in an observed tensor; check the calibration data and the model")


class RangeCalculatorBase(QParamsCalculatorBase):
    """Base for calculators driven by each batch's per-unit min/max.

    Subclasses implement ``update(lo, hi)`` (how a batch's range changes the running range);
    a batch may arrive whole (``observe``) or in chunks whose ranges are merged exactly.
    Subclasses that override ``observe`` directly still work, without chunking.
    """

    supports_chunks: ClassVar[bool] = True

    def __init__(self, spec: QuantizationSpec, layout: QLayout, **kwargs: Any) -> None:
        super().__init__(spec, layout, **kwargs)
        self.min_val: np.ndarray | None = None
        self.max_val: np.ndarray | None = None
        self._batch: tuple[np.ndarray, np.ndarray] | None = None

    #: False for subclasses that look at the tensor themselves (their own observe/observe_chunk)
    _minmax_in_graph: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "observe" in cls.__dict__ and "update" not in cls.__dict__:
            cls.supports_chunks = False  # a user calculator with its own observe: feed whole batches
        if ("observe" in cls.__dict__ or "observe_chunk" in cls.__dict__) and "observe_reduced" not in cls.__dict__:
            cls._minmax_in_graph = False

    def update(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Fold one batch's range into the running range."""
        raise NotImplementedError(f"{type(self).__name__} must implement update(lo, hi) or observe(x)")

    def observe(self, x: np.ndarray) -> None:
        self.observe_chunk(x)
        self.end_batch()

    def graph_reduction(self) -> GraphReduction | None:
        if not (self.supports_chunks and self._minmax_in_graph) or self.layout.block_size is not None:
            return None  # a custom observe(), or per-block ranges: the runner passes the tensor
        return ("minmax", self.layout.axis)

    def observe_chunk(self, x: np.ndarray) -> None:
        self.observe_reduced(reduce_minmax(x, self.layout), 0)

    def observe_reduced(self, values: tuple[np.ndarray, ...], count: int) -> None:
        lo, hi = (np.asarray(v, np.float32) for v in values)
        self._check_finite(np.stack([lo, hi]))  # NaN/Inf anywhere in x shows up in min or max
        if self._batch is not None:
            lo, hi = np.minimum(self._batch[0], lo), np.maximum(self._batch[1], hi)
        self._batch = (lo, hi)

    def end_batch(self) -> None:
        if self._batch is None:
            return
        lo, hi = self._batch
        self._batch = None
        self.update(lo, hi)
        self.num_batches += 1

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val
