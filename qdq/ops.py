"""What qdq knows about each ONNX op type: ports, weight axes, and its role in placement.

This table is the single source of placement rules, used by the annotate pass (ONNX side)
and, through the prepared graph, by the torch mirror.

| op type                              | role        | input ports (activations) | state ports (initializers)   | weight axis: per-channel / per-block |
|--------------------------------------|-------------|---------------------------|------------------------------|--------------------------------------|
| Conv                                 | compute     | X                         | weight (W), bias (B)         | 0 / 1                                |
| ConvTranspose                        | compute     | X                         | weight (W), bias (B)         | 1 / 0                                |
| Gemm                                 | compute     | A                         | weight (B), bias (C)         | transB ? 0 : 1 / transB ? 1 : 0      |
| MatMul                               | compute     | A, B                      | weight (B, when constant)    | -1 / -2                              |
| Add, Sub, Mul                        | compute     | A, B                      | -                            | -                                    |
| Concat                               | compute     | inputs (variadic)         | -                            | -                                    |
| AveragePool, GlobalAveragePool, ReduceMean | compute | X / data                | -                            | -                                    |
| Relu, Clip, LeakyRelu, Sigmoid, ...  | activation  | fused into the compute op before it; not quantized alone |            |                                      |
| Reshape, Transpose, Flatten, MaxPool, ... | passthrough | share the input's qparams; no new range            |            |                                      |

Constant inputs of compute ops that are not state ports (e.g. the constant operand of an
Add) are quantized with the input spec, their qparams computed once at prepare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx
import onnx_ir as ir

__all__ = [
    "ACTIVATION_OPS",
    "OP_TABLE",
    "PASSTHROUGH_OPS",
    "TYPE_ALIASES",
    "OpInfo",
    "canonical_op_type",
    "op_info",
    "port_name",
]


def _gemm_channel_axis(node: ir.Node) -> int:
    trans_b = node.attributes.get_int("transB", 0)
    return 0 if trans_b else 1


def _gemm_block_axis(node: ir.Node) -> int:
    return 1 - _gemm_channel_axis(node)


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """Placement facts for one op type. ``state`` maps port name -> input index."""

    state: dict[str, int] = dataclasses.field(default_factory=dict)
    state_aliases: dict[str, int] = dataclasses.field(default_factory=dict)
    channel_axis: int | Callable[[ir.Node], int] | None = None
    block_axis: int | Callable[[ir.Node], int] | None = None
    state_if_constant: bool = False  # MatMul: B is a weight only when it is a constant
    data_inputs: tuple[int, ...] | None = None  # activation input indices; None = all non-state inputs

    def weight_axes(self, node: ir.Node) -> tuple[int | None, int | None]:
        ch = self.channel_axis(node) if callable(self.channel_axis) else self.channel_axis
        bl = self.block_axis(node) if callable(self.block_axis) else self.block_axis
        return ch, bl

    def state_index(self, key: str) -> int | None:
        return self.state.get(key, self.state_aliases.get(key))


OP_TABLE: dict[str, OpInfo] = {
    "Conv": OpInfo(state={"weight": 1, "bias": 2}, state_aliases={"W": 1, "B": 2}, channel_axis=0, block_axis=1),
    "ConvTranspose": OpInfo(state={"weight": 1, "bias": 2}, state_aliases={"W": 1, "B": 2}, channel_axis=1, block_axis=0),
    "Gemm": OpInfo(state={"weight": 1, "bias": 2}, state_aliases={"B": 1, "C": 2},
                   channel_axis=_gemm_channel_axis, block_axis=_gemm_block_axis),
    "MatMul": OpInfo(state={"weight": 1}, state_aliases={"B": 1}, channel_axis=-1, block_axis=-2, state_if_constant=True),
    "Add": OpInfo(),
    "Sub": OpInfo(),
    "Mul": OpInfo(),
    "Concat": OpInfo(),
    "AveragePool": OpInfo(data_inputs=(0,)),
    "GlobalAveragePool": OpInfo(),
    "ReduceMean": OpInfo(data_inputs=(0,)),
}

#: Element-wise activations fused with the compute op before them (quantized at their output).
ACTIVATION_OPS: frozenset[str] = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu", "Selu",
     "Celu", "Mish", "Softplus"}
)

#: Ops that only move or select values: their outputs share the input's qparams.
PASSTHROUGH_OPS: frozenset[str] = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity", "Slice", "Gather",
     "Expand", "Split", "Tile", "DepthToSpace", "SpaceToDepth"}
)

#: coreai_opt / torch op names -> ONNX op types, so coreai_opt configs keep their meaning.
TYPE_ALIASES: dict[str, tuple[str, ...]] = {
    "conv1d": ("Conv",), "conv2d": ("Conv",), "conv3d": ("Conv",), "conv": ("Conv",),
    "conv_transpose1d": ("ConvTranspose",), "conv_transpose2d": ("ConvTranspose",),
    "conv_transpose3d": ("ConvTranspose",), "linear": ("Gemm", "MatMul"), "matmul": ("MatMul",),
    "bmm": ("MatMul",), "add": ("Add",), "sub": ("Sub",), "mul": ("Mul",), "cat": ("Concat",),
    "concat": ("Concat",), "avg_pool2d": ("AveragePool",), "adaptive_avg_pool2d": ("GlobalAveragePool",),
    "mean": ("ReduceMean",), "max_pool2d": ("MaxPool",), "flatten": ("Flatten",), "relu": ("Relu",),
}


def canonical_op_type(name: str) -> tuple[str, ...]:
    """ONNX op types a config key refers to (itself, or its torch-name alias)."""
    return TYPE_ALIASES.get(name, (name,))


def op_info(op_type: str) -> OpInfo | None:
    return OP_TABLE.get(op_type)


_SCHEMA_CACHE: dict[tuple[str, str], tuple[list[str], list[str]]] = {}


def port_name(node: ir.Node, index: int, *, output: bool = False) -> str | None:
    """The ONNX schema name of input/output ``index`` of ``node`` (None if unknown)."""
    key = (node.domain or "", node.op_type)
    if key not in _SCHEMA_CACHE:
        try:
            schema = onnx.defs.get_schema(node.op_type, domain=node.domain or "")
            _SCHEMA_CACHE[key] = ([p.name for p in schema.inputs], [p.name for p in schema.outputs])
        except onnx.defs.SchemaError:
            _SCHEMA_CACHE[key] = ([], [])
    names = _SCHEMA_CACHE[key][1 if output else 0]
    if not names:
        return None
    if index < len(names):
        return names[index]
    return names[-1]  # variadic
