"""What each backend can execute, as data.

| backend      | weight dtypes                              | activation dtypes              | weight granularity          | activation granularity |
|--------------|--------------------------------------------|--------------------------------|-----------------------------|------------------------|
| onnxruntime  | all eight                                  | all eight                      | tensor / channel / block    | tensor / channel       |
| coreml       | int8 uint8 int4 uint4                      | int8 uint8                     | tensor / channel / block    | tensor                 |
| coreai       | int8 uint8 int4 uint4 float8_e4m3fn e5m2   | int8 uint8 float8_e4m3fn e5m2  | tensor / channel / block    | tensor                 |

Core ML's mlprogram has no float8 and no 16-bit activation quantization (``quantize`` takes
int8/uint8 only); Core AI's ``coreai::quantize``/``constexpr_blockwise_shift_scale`` add float8.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from qdq.dtypes import QDType
from qdq.errors import BackendError, ConfigError
from qdq.plan import QuantPlan

__all__ = ["ExportBackend", "BackendCapabilities", "CAPABILITIES", "check_capabilities"]


class ExportBackend(enum.Enum):
    ONNXRuntime = "onnxruntime"
    CoreML = "coreml"
    CoreAI = "coreai"

    @classmethod
    def parse(cls, value: Any) -> ExportBackend:
        if isinstance(value, cls):
            return value
        text = str(getattr(value, "value", getattr(value, "name", value))).lower().replace("_", "").replace("-", "")
        for member in cls:
            if text in (member.value, member.name.lower()):
                return member
        raise ConfigError(f"unknown backend {value!r}; choose one of {', '.join(m.value for m in cls)}")

    def __str__(self) -> str:
        return self.value


_INT8 = frozenset({QDType.INT8, QDType.UINT8})
_INT4 = frozenset({QDType.INT4, QDType.UINT4})
_FP8 = frozenset({QDType.FLOAT8_E4M3FN, QDType.FLOAT8_E5M2})


@dataclasses.dataclass(frozen=True)
class BackendCapabilities:
    weight_dtypes: frozenset[QDType]
    activation_dtypes: frozenset[QDType]
    weight_granularity: frozenset[str] = frozenset({"per_tensor", "per_channel", "per_block"})
    activation_granularity: frozenset[str] = frozenset({"per_tensor"})


CAPABILITIES: dict[ExportBackend, BackendCapabilities] = {
    ExportBackend.ONNXRuntime: BackendCapabilities(
        weight_dtypes=frozenset(QDType), activation_dtypes=frozenset(QDType),
        activation_granularity=frozenset({"per_tensor", "per_channel"}),
    ),
    ExportBackend.CoreML: BackendCapabilities(weight_dtypes=_INT8 | _INT4, activation_dtypes=_INT8),
    ExportBackend.CoreAI: BackendCapabilities(weight_dtypes=_INT8 | _INT4 | _FP8, activation_dtypes=_INT8 | _FP8),
}


def _granularity(target: Any) -> str:
    if target.layout.axis is None:
        return "per_tensor"
    return "per_channel" if target.layout.block_size is None else "per_block"


def check_capabilities(plan: QuantPlan, backend: ExportBackend) -> None:
    """Raise BackendError naming every tensor ``backend`` cannot run as planned."""
    caps = CAPABILITIES[backend]
    problems: dict[str, list[str]] = {}
    for t in plan.targets.values():
        is_weight = t.kind != "activation"
        dtypes = caps.weight_dtypes if is_weight else caps.activation_dtypes
        grans = caps.weight_granularity if is_weight else caps.activation_granularity
        role = "weight" if is_weight else "activation"
        if t.spec.dtype not in dtypes:
            problems.setdefault(f"{t.spec.dtype} {role}s", []).append(t.tensor)
        elif _granularity(t) not in grans:
            problems.setdefault(f"{_granularity(t)} {role}s", []).append(t.tensor)
    if problems:
        parts = []
        for what, tensors in problems.items():
            shown = ", ".join(tensors[:5]) + (f" (+{len(tensors) - 5} more)" if len(tensors) > 5 else "")
            parts.append(f"{what}: {shown}")
        raise BackendError(
            f"{backend.value} does not support " + "; ".join(parts)
            + f" — change those specs (supported {backend.value} weight dtypes: "
            + ", ".join(sorted(str(d) for d in caps.weight_dtypes)) + "; activation dtypes: "
            + ", ".join(sorted(str(d) for d in caps.activation_dtypes))
            + ") or set them to None in op_type_configs/op_name_configs"
        )
