"""Small readers of QuantizeLinear / DequantizeLinear nodes shared by the finalize passes (private)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qdq.dtypes import QDType
from qdq.layout import QLayout

__all__ = [
    "add_initializer",
    "const_array",
    "drop_if_unused",
    "is_dq",
    "is_q",
    "node_layout",
    "q_kind",
    "qdtype",
    "quant_ir_dtype",
    "uint8_twin",
    "unique_initializer_name",
]

_ONNX_DOMAINS = ("", "ai.onnx")


def is_q(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "QuantizeLinear" and node.domain in _ONNX_DOMAINS


def is_dq(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.domain in _ONNX_DOMAINS


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer or folded constant), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def quant_ir_dtype(node: ir.Node) -> ir.DataType:
    """The quantized dtype of a Q or DQ node: its zero point's, else ``output_dtype`` / the DQ input's, else uint8."""
    zp = _input(node, 2)
    if zp is not None and zp.dtype is not None:
        return zp.dtype
    if is_dq(node):
        src = node.inputs[0]
        if src is not None and src.dtype is not None:
            return src.dtype
    out_dt = node.attributes.get_int("output_dtype", 0)
    return ir.DataType(out_dt) if out_dt else ir.DataType.UINT8


def _scale_dims(scale: ir.Value | None) -> tuple[int, ...]:
    if scale is None:
        return ()
    if scale.const_value is not None:
        return tuple(scale.const_value.shape.numpy())
    if scale.shape is not None and scale.shape.is_static():
        return tuple(scale.shape.numpy())
    return ()


def node_layout(node: ir.Node, rank: int) -> QLayout:
    """The QLayout of a Q/DQ node's scale for an input of ``rank`` (ONNX: one-element scale = per tensor)."""
    dims = _scale_dims(node.inputs[1])
    block = node.attributes.get_int("block_size", 0)
    if not block and int(np.prod(dims, dtype=np.int64)) == 1 and len(dims) <= 1:
        return QLayout()
    axis = node.attributes.get_int("axis", 1) % max(rank, 1)
    return QLayout(axis=axis, block_size=block or None)


def q_kind(node: ir.Node) -> str:
    """``weight`` / ``constant`` / ``activation``: the Q node's ``qdq.kind``, else weight iff its input is constant."""
    kind = node.metadata_props.get("qdq.kind")
    if kind:
        return kind
    src = node.inputs[0]
    return "weight" if src is not None and src.const_value is not None else "activation"


def unique_initializer_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... if an initializer already has that name."""
    name, i = base, 1
    while name in graph.initializers:
        name = f"{base}_{i}"
        i += 1
    return name


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named ``base`` (or ``base_N`` if taken); returns its value."""
    tensor = ir.tensor(array)
    value = ir.Value(name=unique_initializer_name(graph, base), shape=ir.Shape(np.shape(array)),
                     type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> bool:
    """Remove an initializer (or the Constant node producing ``value``) nothing reads any more."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return False
    name = value.name
    if value.is_initializer() and name is not None and graph.initializers.get(name) is value:
        del graph.initializers[name]
        return True
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
        graph.remove(producer, safe=True)
        return True
    return False


def qdtype(ir_dtype: ir.DataType) -> QDType | None:
    """The QDType stored as ``ir_dtype``, or None (int32 bias and others)."""
    try:
        return QDType.from_ir(ir_dtype)
    except KeyError:
        return None


def uint8_twin(graph: ir.Graph, value: ir.Value, readers: set[int], done: dict[int, ir.Value]) -> ir.Value:
    """The uint8 twin (+128) of int8 constant ``value`` (a zero point, or weight codes): converted in place when only
    nodes in ``readers`` (ids) read it, else a new initializer; ``done`` (id -> twin) converts each once."""
    if id(value) in done:
        return done[id(value)]
    z = const_array(value)
    assert z is not None
    u8 = (z.astype(np.int16) + 128).astype(np.uint8)
    if value.is_initializer() and all(id(u.node) in readers for u in value.uses()):
        value.const_value = ir.tensor(u8, dtype=ir.DataType.UINT8, name=value.name)
        value.type = ir.TensorType(ir.DataType.UINT8)  # a new type: clones share TensorType objects
        twin = value
    else:
        twin = add_initializer(graph, f"{value.name or 'constant'}_uint8", u8)
    done[id(value)] = twin
    return twin
