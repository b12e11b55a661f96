"""Model checks run at load time, before any work: a broken model is one named ModelError.

Checks, cheapest first: the graph is wired (every node input and graph output has a producer),
external data files exist, are long enough and stay inside the model folder (checked by qdq
itself, never by reading outside it), and ``onnx.checker`` accepts the proto (with strict shape
inference when the model is small and uses only standard domains).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from qdq.errors import ModelError

__all__ = ["FULL_CHECK_MAX_BYTES", "MIN_OPSET", "check_graph", "check_proto", "expected_bytes", "external_locations"]

logger = logging.getLogger(__name__)

#: Oldest default-domain opset qdq upgrades from (onnx's version converter has adapters from here on).
MIN_OPSET = 7
#: Strict shape inference (``full_check``) only for protos up to this size: it is cheap there.
FULL_CHECK_MAX_BYTES = 256_000_000
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _checker_message(exc: Exception) -> str:
    """onnx.checker's message in one line: the first line plus its 'Context' line (which names the node)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    context = next((line.replace("==> Context:", "").strip() for line in lines[1:] if "Context" in line), "")
    text = " ".join(lines[0].split())
    return (f"{text} ({context})" if context else text)[:400]


def check_proto(proto: onnx.ModelProto, *, source: str, base_dir: str | os.PathLike[str] | None,
                path: str | os.PathLike[str] | None = None) -> None:
    """Raise ModelError naming what is wrong with ``proto`` (read from ``source``, external data in ``base_dir``).

    ``path``: the file ``proto`` was read from; onnx.checker then checks external data in place.
    """
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelError(f"{source} is not an ONNX model (no graph or ir_version); re-export it (qdq export)")
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelError(f"{source} has ir_version {proto.ir_version}, newer than the installed onnx supports "
                         f"({onnx.IR_VERSION}); upgrade onnx (pip install -U onnx) or re-export at an older ir_version")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_OPSET:
        raise ModelError(f"{source} uses opset {opset}; qdq reads opset {MIN_OPSET} and newer: re-export it at opset "
                         "13 or newer")
    _check_wiring(proto.graph, source)
    for node in proto.graph.node:  # before the checker, which only prints a warning for experimental ops
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise ModelError(f"{source}: op {node.op_type} (node '{node.name}') is not a standard ONNX op "
                             "(unknown, experimental or removed from ONNX); replace it and re-export the model")
    external = _external_tensors(proto.graph)
    if base_dir is not None:
        for tensor in external:
            _check_external(tensor, Path(base_dir), source)
    # a proto with external data is checked from its file, so the checker finds the data beside it
    target: onnx.ModelProto | str = str(path) if external and path is not None else proto
    try:
        onnx.checker.check_model(target)
    except Exception as exc:
        raise ModelError(f"{source} is not a valid ONNX model: {_checker_message(exc)}") from exc
    standard = all(n.domain in _STANDARD_DOMAINS for n in proto.graph.node)
    size = proto.ByteSize() + sum(expected_bytes(t) or 0 for t in external)
    if standard and not proto.functions and size <= FULL_CHECK_MAX_BYTES:
        if external and path is not None:  # shape inference reads constants (axes, shapes) from the data itself
            target = onnx.load(str(path))
        elif external:
            return  # a proto whose data is elsewhere: no strict check
        try:
            onnx.checker.check_model(target, full_check=True)
        except Exception as exc:
            raise ModelError(f"{source} fails onnx shape inference: {_checker_message(exc)}; fix the export") from exc


def _check_wiring(graph: onnx.GraphProto, source: str) -> None:
    """Every node input and graph output of the main graph has a producer (one pass over the nodes)."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        known.update(o for o in node.output if o)
    for node in graph.node:
        for name in node.input:
            if name and name not in known:
                raise ModelError(
                    f"{source}: node '{node.name}' ({node.op_type}) reads tensor '{name}', which no node, graph "
                    "input or initializer produces; the model is incomplete: re-export it"
                )
    for out in graph.output:
        if out.name not in known:
            raise ModelError(f"{source}: graph output '{out.name}' is produced by no node, input or initializer; "
                             "the model is incomplete: re-export it")


def _external_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    tensors = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                tensors.append(attr.t)
    return tensors


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes of a tensor's data from its dims and type (None for a type without a fixed size)."""
    count = 1
    for d in tensor.dims:
        count *= int(d)
    try:
        itemsize = ir.DataType(tensor.data_type).itemsize
    except (TypeError, ValueError):
        return None
    return math.ceil(count * itemsize)


def _check_external(tensor: onnx.TensorProto, base_dir: Path, source: str) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    what = f"external data file '{location}' for initializer '{tensor.name}' of {source}"
    norm = os.path.normpath(location) if location else ""
    if not location or os.path.isabs(location) or norm == ".." or norm.startswith(".." + os.sep):
        raise ModelError(f"{what} is outside the model folder; external data must be a relative path inside "
                         f"{base_dir}: move the file there and fix its location")
    path = base_dir / norm
    if not path.is_file():
        raise ModelError(f"{what} is missing (looked for {path}); put the data file beside the model")
    offset = int(info.get("offset", 0) or 0)
    length = int(info["length"]) if info.get("length") else expected_bytes(tensor)
    size = path.stat().st_size
    if length is not None and offset + length > size:
        raise ModelError(f"{what} is short: {size} bytes, the tensor needs bytes {offset}..{offset + length}; "
                         "the file is truncated or belongs to another model: re-export it")


def external_locations(model: ir.Model) -> set[Path]:
    """Resolved paths of the external data files ``model``'s initializers read."""
    paths: set[Path] = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            paths.add(Path(tensor.path).resolve())
    return paths


def check_graph(model: ir.Model, source: str = "the model") -> None:
    """The in-memory counterpart of the wiring check: every value a node reads has a producer."""
    graph = model.graph
    for node in graph:
        for value in node.inputs:
            if value is None or value.producer() is not None or value.is_graph_input():
                continue
            if value.is_initializer() or value.const_value is not None:
                continue
            raise ModelError(
                f"{source}: node '{node.name}' ({node.op_type}) reads tensor '{value.name}', which no node, graph "
                "input or initializer produces; the model is incomplete: re-export it"
            )
