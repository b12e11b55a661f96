"""The contract between the prepared QDQ graph and a torch-program backend (Core ML, Core AI).

A prepared QDQ model (float weights, calibrated Q->DQ pairs) is lowered to a ``torch.nn.Module``
by :mod:`qdq.backends.torch_program`: every op runs as in the QAT mirror, and every Q->DQ pair
becomes a module built by the backend's :class:`BackendOps`:

* a weight (or constant) site -> :meth:`BackendOps.weight_module`: holds the integer codes (never
  the float weight) and returns the dequantized weight from ``forward()``; the backend picks the
  op its converter reads as a constexpr (``quantized_decomposed.dequantize_per_channel`` for
  Core ML, ``coreai::constexpr_blockwise_shift_scale`` for Core AI);
* an activation site -> :meth:`BackendOps.activation_module`: ``forward(x)`` quantizes and
  dequantizes ``x`` with the backend's ops.

Codes are computed by qdq's exact ONNX numerics, so the program computes what onnxruntime
computes on the prepared model, up to float rounding. A backend package (``qdq.backends.coreml``,
``qdq.backends.coreai``) provides ``OPS: BackendOps``, ``legalize(model, options) -> list[Note]``,
``convert(program, options)`` and ``save(lowered, path, options)``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from qdq.dtypes import QDType
from qdq.errors import ConfigError
from qdq.layout import QLayout

__all__ = ["COMPUTE_PRECISIONS", "DEPLOYMENT_TARGETS", "BackendOps", "BackendOptions", "LegalizationNote", "LoweredProgram", "SiteInfo"]


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """One Q->DQ pair of the prepared graph, in ONNX conventions.

    ``scale`` / ``zero_point`` have the ONNX QuantizeLinear shapes of ``layout`` (scalar, 1-D
    along ``layout.axis``, or the blocked shape); ``zero_point`` is int32 for integer dtypes and
    zeros for float8. ``shape`` is the quantized tensor's shape when known (always for weights).
    """

    key: str
    tensor: str
    kind: str  # "weight" | "constant" | "activation"
    dtype: QDType
    layout: QLayout
    scale: np.ndarray
    zero_point: np.ndarray
    shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class LegalizationNote:
    """What legalization did to one tensor (kept at 8 bits, left float, narrowed ...) and why."""

    tensor: str
    action: str
    reason: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.action} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Conversion options shared by the torch-program backends.

    ``deployment_target``: Core ML minimum deployment target (``"iOS17"`` default; ``"iOS18"``
    for int4 per-block weights). ``compute_precision``: ``"float32"`` (default) or ``"float16"``.
    ``input_names`` / ``output_names``: names in the converted model (default: the ONNX graph's).
    ``dynamic_batch``: export the batch dimension as dynamic where the ONNX model has it.
    """

    deployment_target: str = "iOS17"
    compute_precision: str = "float32"
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    dynamic_batch: bool = True

    def __post_init__(self) -> None:
        if self.deployment_target not in DEPLOYMENT_TARGETS:
            raise ConfigError(f"unknown deployment target {self.deployment_target!r}; "
                              f"choose {' or '.join(DEPLOYMENT_TARGETS)}")
        if self.compute_precision not in COMPUTE_PRECISIONS:
            raise ConfigError(f"unknown compute precision {self.compute_precision!r}; "
                              f"choose {' or '.join(COMPUTE_PRECISIONS)}")


#: Core ML minimum deployment targets qdq converts for, and the compute precisions of the converted model.
DEPLOYMENT_TARGETS = ("iOS17", "iOS18")
COMPUTE_PRECISIONS = ("float32", "float16")


class BackendOps(abc.ABC):
    """The ops one backend's converter reads, as torch modules for each Q->DQ site."""

    name: str = ""

    @abc.abstractmethod
    def weight_module(self, site: SiteInfo, codes: np.ndarray) -> Any:
        """An ``nn.Module`` whose ``forward()`` returns the dequantized weight.

        ``codes`` are ONNX QuantizeLinear's output values for the weight (int32 for integer
        dtypes, float32 holding exact float8 values for float8), shape ``site.shape``.
        """

    @abc.abstractmethod
    def activation_module(self, site: SiteInfo) -> Any:
        """An ``nn.Module`` whose ``forward(x)`` returns ``DequantizeLinear(QuantizeLinear(x))``."""

    def decompositions(self) -> Any:
        """The decomposition table for ``ExportedProgram.run_decompositions`` (default: core ATen)."""
        return {}


@dataclasses.dataclass
class LoweredProgram:
    """A prepared QDQ model lowered for one backend.

    ``program``: the ``torch.export.ExportedProgram`` (decomposed for the backend's converter);
    ``module``: the eager module it was traced from; ``notes``: what legalization changed.
    """

    backend: str
    program: Any
    module: Any
    input_names: Sequence[str]
    output_names: Sequence[str]
    example_inputs: tuple[Any, ...]
    options: BackendOptions
    notes: list[LegalizationNote] = dataclasses.field(default_factory=list)
