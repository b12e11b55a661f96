"""The lowest ONNX opset that can express the quantization in use, and raising a model to it.

| feature                                   | opset |
|-------------------------------------------|-------|
| int8 / uint8, per-tensor or per-channel   | 13    |
| float8 e4m3fn / e5m2                      | 19    |
| int16 / uint16 / int4 / uint4, per-block  | 21    |

Models from opset 7 on are upgraded with onnx's own version converter (``onnx.version_converter``,
on the proto: it has adapters for Upsample -> Resize, Dropout's ratio, Softmax's axis, ...); an op
it cannot convert is one ModelError naming the op and its node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx
import onnx.version_converter
import onnx_ir as ir

from qdq.errors import ModelError, first_line
from qdq.spec import QuantizationSpec

__all__ = [
    "BASE_OPSET",
    "MIN_IR_VERSION",
    "ensure_opset",
    "model_opset",
    "required_opset",
    "upgrade_model",
    "upgrade_proto",
]

logger = logging.getLogger(__name__)

#: IR version needed per opset (int4 and opset 21 need IR 10).
MIN_IR_VERSION = {13: 7, 19: 9, 21: 10}
#: The opset every quantized model has at least (per-channel QuantizeLinear/DequantizeLinear).
BASE_OPSET = 13


def required_opset(specs: Iterable[QuantizationSpec]) -> int:
    """Lowest opset whose QuantizeLinear/DequantizeLinear support every spec's dtype."""
    need = BASE_OPSET
    for spec in specs:
        need = max(need, spec.dtype.min_opset)
    return need


def model_opset(model: ir.Model | onnx.ModelProto) -> int | None:
    """The default-domain opset of ``model`` (None if it imports none)."""
    if isinstance(model, onnx.ModelProto):
        return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _ir_version_for(opset: int) -> int:
    return max(v for k, v in MIN_IR_VERSION.items() if k <= max(opset, BASE_OPSET))


def _blocking_nodes(proto: onnx.ModelProto, start: int, target: int) -> tuple[int, list[onnx.NodeProto]]:
    """Convert one opset at a time to find the step that fails and the nodes whose op changes at that step."""
    current = proto
    for version in range(start + 1, target + 1):
        try:
            current = onnx.version_converter.convert_version(current, version)
        except Exception:  # noqa: BLE001 - any converter failure means this step blocks
            nodes = []
            for node in current.graph.node:
                if node.domain not in ("", "ai.onnx"):
                    continue
                try:
                    since = onnx.defs.get_schema(node.op_type, version, node.domain).since_version
                except onnx.defs.SchemaError:
                    since = version  # no schema at this opset at all: removed or never standard
                if since == version or not onnx.defs.has(node.op_type, node.domain):
                    nodes.append(node)
            return version, nodes
    return target, []


def upgrade_proto(proto: onnx.ModelProto, target: int, *, source: str = "the model") -> onnx.ModelProto:
    """``proto`` converted to default-domain opset ``target`` by onnx's version converter (a new proto).

    Initializers still listed as graph inputs (IR < 4 style) stop being inputs, and the IR version
    is raised to what ``target`` needs.
    """
    current = model_opset(proto)
    if current is None or current >= target:
        return proto
    unknown = [n for n in proto.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)]
    if unknown:
        node = unknown[0]
        raise ModelError(f"{source}: op {node.op_type} (node '{node.name}') is not a standard ONNX op in opset "
                         f"{target}, so the model cannot be upgraded from opset {current}; replace that op and "
                         f"re-export at opset {target} or newer")
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:
        version, nodes = _blocking_nodes(proto, current, target)
        named = ", ".join(f"{n.op_type} (node '{n.name}')" for n in nodes[:3]) or first_line(exc)
        raise ModelError(f"{source}: onnx's version converter cannot upgrade {named} from opset {version - 1} to "
                         f"{version}; re-export the model at opset {target} or newer") from exc
    initializers = {t.name for t in converted.graph.initializer}
    if any(v.name in initializers for v in converted.graph.input):
        kept = [v for v in converted.graph.input if v.name not in initializers]
        del converted.graph.input[:]
        converted.graph.input.extend(kept)
    converted.ir_version = max(converted.ir_version, _ir_version_for(target))
    logger.info("upgraded %s from opset %s to %d with onnx's version converter", source, current, target)
    return converted


def upgrade_model(model: ir.Model, target: int, *, source: str = "the model") -> ir.Model:
    """``model`` at default-domain opset ``target`` or newer (the same object when it already is)."""
    current = model_opset(model)
    if current is not None and current >= target:
        return model
    base_dir = next((str(v.const_value.base_dir) for v in model.graph.initializers.values()
                     if isinstance(v.const_value, ir.ExternalTensor)), None)
    proto = upgrade_proto(ir.serde.serialize_model(model), target, source=source)
    upgraded = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(upgraded.graph, base_dir)
    return upgraded


def ensure_opset(model: ir.Model, opset: int, *, blocked: bool = False) -> None:
    """Raise the default-domain opset of ``model`` (in place) to at least ``opset`` (21 if blocked).

    qdq's Quantizer upgrades the float model at load, so this is usually a no-op; models that
    still need it are converted by onnx's version converter and their graph swapped in.
    """
    if blocked:
        opset = max(opset, 21)
    current = model_opset(model)
    if current is None or current < opset:
        upgraded = upgrade_model(model, opset)
        model.graph = upgraded.graph
        model.functions.clear()
        model.functions.update(upgraded.functions)
        model.ir_version = upgraded.ir_version
        logger.info("raised opset %s -> %d", current, opset)
    target_opset = model_opset(model) or opset
    need_ir = _ir_version_for(target_opset)
    model.ir_version = max(model.ir_version, need_ir)
