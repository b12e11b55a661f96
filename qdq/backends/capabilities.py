"""What each backend can execute, as data.

| backend      | weight dtypes                              | activation dtypes              | weight granularity          | activation granularity |
|--------------|--------------------------------------------|--------------------------------|-----------------------------|------------------------|
| onnxruntime  | all eight                                  | all eight                      | tensor / channel / block    | tensor / channel       |
| coreml       | int8 uint8 int4 uint4                      | int8 uint8                     | tensor / channel / block    | tensor                 |
| coreai       | int8 uint8 int4 uint4 float8_e4m3fn e5m2   | int8 uint8 float8_e4m3fn e5m2  | tensor / channel / block    | tensor / channel       |

Core ML's mlprogram has no float8 and no 16-bit activation quantization (``quantize`` takes
int8/uint8 only, per tensor); Core AI's ``coreai::quantize``/``constexpr_blockwise_shift_scale`` add float8
and per-channel activations. Option-dependent rules (Core ML's iOS18 for 4-bit weights) live in each
backend's ``legalize_plan``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator
from typing import Any

import onnx_ir as ir

from qdq.dtypes import QDType
from qdq.errors import BackendError, ConfigError
from qdq.plan import QuantPlan

__all__ = ["CAPABILITIES", "BackendCapabilities", "ExportBackend", "check_capabilities", "check_plan",
           "planned_tensors", "quantized_tensors"]


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
    ExportBackend.CoreAI: BackendCapabilities(weight_dtypes=_INT8 | _INT4 | _FP8, activation_dtypes=_INT8 | _FP8,
                                              activation_granularity=frozenset({"per_tensor", "per_channel"})),
}


def quantized_tensors(model: ir.Model) -> Iterator[tuple[str, str, QDType, str]]:
    """(tensor, role, dtype, granularity) of every QuantizeLinear / weight DequantizeLinear in ``model``."""
    for node in model.graph:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if node.op_type == "DequantizeLinear" and (src is None or src.const_value is None):
            continue  # activation DQ: its Q is checked
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        ir_dtype = zp.dtype if zp is not None else (
            src.dtype if node.op_type == "DequantizeLinear" and src is not None else None)
        try:
            dtype = QDType.from_ir(ir_dtype) if ir_dtype is not None else QDType.UINT8
        except KeyError:
            continue  # int32 bias and other non-quantization DQs
        kind = node.metadata_props.get("qdq.kind")
        weight = kind in ("weight", "constant") if kind else (src is not None and src.const_value is not None)
        scale = node.inputs[1]
        rank = len(scale.shape) if scale is not None and scale.shape is not None else 0
        gran = "per_block" if node.attributes.get_int("block_size", 0) else ("per_channel" if rank else "per_tensor")
        name = node.metadata_props.get("qdq.tensor") or (src.name if src is not None else node.name) or ""
        yield name, "weight" if weight else "activation", dtype, gran


def check_capabilities(model: ir.Model, backend: ExportBackend) -> None:
    """Raise BackendError naming every quantized tensor of ``model`` that ``backend`` cannot run."""
    _raise_unsupported(_problems(quantized_tensors(model), backend), backend)


def check_plan(plan: QuantPlan, backend: Any) -> None:
    """The same check on a plan, before any calibration: every planned (tensor, spec) pair must run on ``backend``."""
    backend = ExportBackend.parse(backend)
    _raise_unsupported(_problems(planned_tensors(plan), backend), backend)


def planned_tensors(plan: QuantPlan) -> Iterator[tuple[str, str, QDType, str]]:
    """(tensor, role, dtype, granularity) of every planned QDQ pair (role "weight" or "activation")."""
    for t in plan.targets.values():
        gran = "per_block" if t.layout.block_size is not None else ("per_tensor" if t.layout.axis is None
                                                                    else "per_channel")
        yield t.tensor, "weight" if t.kind in ("weight", "constant") else "activation", t.spec.dtype, gran


def _problems(pairs: Iterable[tuple[str, str, QDType, str]], backend: ExportBackend) -> dict[str, list[str]]:
    caps = CAPABILITIES[backend]
    problems: dict[str, list[str]] = {}
    for tensor, role, dtype, gran in pairs:
        dtypes = caps.weight_dtypes if role == "weight" else caps.activation_dtypes
        grans = caps.weight_granularity if role == "weight" else caps.activation_granularity
        if dtype not in dtypes:
            problems.setdefault(f"{dtype} {role}s", []).append(tensor)
        elif gran not in grans:
            problems.setdefault(f"{gran} {role}s", []).append(tensor)
    return problems


def _raise_unsupported(problems: dict[str, list[str]], backend: ExportBackend) -> None:
    if not problems:
        return
    caps = CAPABILITIES[backend]
    parts = []
    for what, tensors in problems.items():
        tensors = list(dict.fromkeys(tensors))
        shown = ", ".join(tensors[:5]) + (f" (+{len(tensors) - 5} more)" if len(tensors) > 5 else "")
        parts.append(f"{what}: {shown}")
    raise BackendError(
        f"{backend.value} does not support " + "; ".join(parts)
        + f" — change those specs (supported {backend.value} weight dtypes: "
        + ", ".join(sorted(str(d) for d in caps.weight_dtypes)) + "; activation dtypes: "
        + ", ".join(sorted(str(d) for d in caps.activation_dtypes))
        + ") or set them to None in op_type_configs/op_name_configs"
    )
