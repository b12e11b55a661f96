"""Annotate: decide which tensors get QDQ pairs (writes a QuantPlan; does not touch the graph).

Rules, in one place:
- Op config precedence: op name (exact, else full-regex match) -> op type -> global; ``None`` = float.
- Compute ops (qdq/ops.py OP_TABLE) quantize state ports (constant weights), input ports and
  their output. An element-wise activation that is the only consumer of a compute op's output
  is fused: the output spec applies after the activation, nothing between them.
- Known-range rule (coreai_opt's, generalised by qdq/passes/value_ranges.py): an integer activation
  whose values are provably non-negative (after Relu / Clip(min >= 0) / Sigmoid / HardSigmoid /
  Softplus / Softmax, and through pooling, means, shape ops, Concat, Add and Mul of such tensors)
  or bounded below only (after HardSwish, Gelu, Elu, ...) is asymmetric: no codes are wasted on
  values that cannot occur.
- Float islands: an element-wise Add/Sub/Mul or a Concat whose output only float ops read (directly,
  through other such ops or through pass-through ops such as a class-token Gather; a transformer's
  residual Add feeding LayerNorm) computes in float: no pair on its output or its inputs. A MatMul/Gemm output only such ops read stays float too (onnxruntime runs the MatMul on
  integers anyway: MatMulIntegerToFloat); Conv keeps its output pair (QLinearConv needs it). On
  all-MiniLM-L6-v2 int8: cosine to FP32 0.851 -> 0.990; CNNs (residual Add read by a Conv) are unchanged.
- Graph outputs (``float_graph_outputs``, on in every preset): the caller reads them as float, so a graph
  output gets no pair unless its producer is a Conv / ConvTranspose (QLinearConv needs the pair) or another
  reader quantizes it; the logits Gemm runs as QGemm with float output.
- Mask arithmetic (float math on integer inputs and small constants, e.g. ``(1 - mask) * finfo.min``)
  stays float, and so does the output of an Add that applies such a mask (its range is the mask's).
- One pair per tensor and spec. When a producer quantizes its output, every consumer reads that
  pair; a consumer whose input spec asks for the same dtype reuses it (the producer's spec wins),
  one asking for another dtype gets its own pair on the float tensor.
- Embedding tables (Gather of rows of a constant 2-D float table) are weights: the op state spec
  ``weight`` quantizes them per row (axis 0), at 8 bits (a 4-bit, float8 or blocked weight spec gives
  int8 per row: ONNX Gather reads 8-bit tables only); the looked-up rows stay float (a transformer adds
  position embeddings and normalizes them next).
- Pass-through ops (Reshape, Transpose, MaxPool, ...) whose input is quantized give their
  outputs a pair that shares the input's qparams: no re-quantization.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import onnx_ir as ir

from qdq.config import ModuleQuantizerConfig, QuantizerConfig
from qdq.dtypes import QDType
from qdq.errors import ConfigError
from qdq.graph.types import fill_missing_dtypes
from qdq.layout import QLayout, resolve_layout
from qdq.ops import ACTIVATION_OPS, OP_TABLE, PASSTHROUGH_OPS, canonical_op_type, port_name
from qdq.passes.value_ranges import ValueFacts
from qdq.plan import QuantPlan, QuantTarget, TargetKind
from qdq.spec import PerChannelGranularity, PerTensorGranularity, QScheme, QuantizationSpec

__all__ = ["KEEP_FLOAT", "annotate", "config_resolver", "unquantized_nodes"]

#: Node metadata key marking a node an algorithm inserted that the planner must leave float (a SmoothQuant Mul).
KEEP_FLOAT = "qdq.keep_float"

logger = logging.getLogger(__name__)

_REGEX_CHARS = re.compile(r"[\\^$.*+?()\[\]{}|]")


class _ConfigResolver:
    """Per-node config lookup with validation of names and types against the model."""

    def __init__(self, config: QuantizerConfig, graph: ir.Graph) -> None:
        self.config = config
        names = [n.name for n in graph if n.name]
        name_set = set(names)
        types_present = {n.op_type for n in graph}
        self.by_name: dict[str, ModuleQuantizerConfig | None] = {}
        self.patterns: list[tuple[re.Pattern[str], ModuleQuantizerConfig | None]] = []
        for key, cfg in config.op_name_configs.items():
            if key in name_set:
                self.by_name[key] = cfg
                continue
            pattern = None
            bad_regex = ""
            if _REGEX_CHARS.search(key):
                try:
                    pattern = re.compile(key)
                except re.error as exc:
                    bad_regex = (f", and it is not a valid regular expression ({exc}; write a pattern like "
                                 "'.*MatMul.*', or escape the special characters with \\)")
            if pattern is None or not any(pattern.fullmatch(n) for n in names):
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"{bad_regex}; close matches: {', '.join(close)}" if close else bad_regex
                raise ConfigError(
                    f"op_name_configs key '{key}' matches no node in the model{hint} "
                    "(list node names with: qdq inspect MODEL.onnx)"
                )
            self.patterns.append((pattern, cfg))
        self.by_type: dict[str, ModuleQuantizerConfig | None] = {}
        for key, cfg in config.op_type_configs.items():
            hits = [t for t in canonical_op_type(key) if t in types_present]
            if not hits:
                close = difflib.get_close_matches(key, sorted(types_present), n=3)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise ConfigError(
                    f"op_type_configs key '{key}' matches no op type in the model{hint}; "
                    f"the model has: {', '.join(sorted(types_present))}"
                )
            for t in hits:
                self.by_type[t] = cfg

    def resolve(self, node: ir.Node) -> tuple[ModuleQuantizerConfig | None, bool]:
        """(config or None, whether the user named this node or its type explicitly)."""
        if node.name in self.by_name:
            return self.by_name[node.name], True
        for pattern, cfg in self.patterns:
            if pattern.fullmatch(node.name or ""):
                return cfg, True
        if node.op_type in self.by_type:
            return self.by_type[node.op_type], True
        return self.config.global_config, False


_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _is_float(value: ir.Value) -> bool:
    """Only float tensors are quantized (index math in int64 stays as is); unknown type counts as float."""
    return value.dtype is None or value.dtype in _FLOAT_TYPES


def config_resolver(config: QuantizerConfig, graph: ir.Graph) -> Callable[[ir.Node], ModuleQuantizerConfig | None]:
    """The config a node resolves to (op name -> op type -> global; None = float), as annotate resolves it."""
    resolver = _ConfigResolver(config, graph)
    return lambda node: resolver.resolve(node)[0]


def unquantized_nodes(model: ir.Model, config: QuantizerConfig) -> set[str]:
    """Names of the nodes ``config`` leaves float (resolved to ``None`` by op name, op type or global)."""
    resolver = _ConfigResolver(config, model.graph)
    return {n.name for n in model.graph if n.name and resolver.resolve(n)[0] is None}


def _is_constant(value: ir.Value) -> bool:
    return value.const_value is not None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _range_scheme(spec: QuantizationSpec, value: ir.Value, facts: ValueFacts) -> QuantizationSpec:
    """Known-range rule: one-sided integer activations (non-negative, or bounded below only) are asymmetric."""
    if spec.dtype.is_float or spec.qscheme is QScheme.ASYMMETRIC:
        return spec
    return spec.replace(qscheme=QScheme.ASYMMETRIC) if facts.interval(value).one_sided else spec


class _PlanBuilder:
    def __init__(self, graph: ir.Graph, facts: ValueFacts) -> None:
        self.graph = graph
        self.facts = facts
        self.plan = QuantPlan()
        self.by_tensor: dict[str, list[QuantTarget]] = {}

    def _new_key(self, base: str) -> str:
        key, i = base, 1
        while key in self.plan.targets:
            key = f"{base}:{i}"
            i += 1
        return key

    def _add(self, target: QuantTarget) -> QuantTarget:
        self.plan.targets[target.key] = target
        self.by_tensor.setdefault(target.tensor, []).append(target)
        return target

    def _activation_layout(self, spec: QuantizationSpec, value: ir.Value) -> QLayout:
        rank = _rank(value)
        if rank is None:
            if spec.granularity.to_dict()["type"] != "per_tensor":
                raise ConfigError(f"tensor '{value.name}' has unknown rank; use per_tensor granularity for it")
            return QLayout()
        return resolve_layout(spec.granularity, rank, what=f"activation '{value.name}'")

    def state(self, node: ir.Node, value: ir.Value, spec: QuantizationSpec, kind: TargetKind,
              port: str | None = None, axes: tuple[int | None, int | None] | None = None) -> None:
        if axes is not None:
            ch, bl = axes
        else:
            info = OP_TABLE[node.op_type]
            ch, bl = info.weight_axes(node) if kind == "weight" else ((0, 0) if port == "bias" else (None, None))
        rank = len(value.const_value.shape)  # type: ignore[union-attr]
        granularity = spec.granularity
        if (kind == "weight" and node.op_type == "MatMul" and getattr(granularity, "axis", 0) is None
                and (rank == 1 and not isinstance(granularity, PerTensorGranularity)
                     or rank > 2 and isinstance(granularity, PerChannelGranularity))):
            # a vector weight: the op's default axes are not its output channels; a batched one: onnxruntime's
            # fused integer MatMul takes per-column scales of 2-D weights only (blocks of a batched weight stay,
            # it runs them float). One scale, unless the config names an axis
            logger.info("weight '%s' of MatMul '%s' has rank %d: quantized per tensor", value.name, node.name, rank)
            spec = dataclasses.replace(spec, granularity=PerTensorGranularity())
        layout = resolve_layout(spec.granularity, rank, channel_axis=ch, block_axis=bl,
                                what=f"{kind} '{value.name}' of node '{node.name}'")
        existing = self.by_tensor.get(value.name or "", [])
        uses = [(node.name or "", i) for i, v in enumerate(node.inputs) if v is value]
        for t in existing:
            if t.spec == spec and t.layout == layout:
                t.ops.append(node.name or "")
                if t.uses is not None:
                    t.uses.extend(uses)
                return
        # a tensor shared by ops that need another grid (a tied weight read by Gemm transB=1 and transB=0: other
        # channel axes): the first grid serves every reader, each later one only its own
        self._add(QuantTarget(self._new_key(value.name or node.name or ""), value.name or "", spec, layout,
                              kind, uses=uses if existing else None, ops=[node.name or ""]))

    def output(self, node: ir.Node, value: ir.Value, spec: QuantizationSpec) -> None:
        if any(t.uses is None for t in self.by_tensor.get(value.name or "", [])):
            return
        if self.facts.is_mask(value) or self.facts.applies_mask(node):
            return
        spec = _range_scheme(spec, value, self.facts)
        layout = self._activation_layout(spec, value)
        self._add(QuantTarget(self._new_key(value.name or ""), value.name or "", spec, layout, "activation",
                              uses=None, ops=[node.name or ""]))

    def input(self, node: ir.Node, index: int, value: ir.Value, spec: QuantizationSpec) -> None:
        if self.facts.is_mask(value):
            return
        spec = _range_scheme(spec, value, self.facts)
        existing = self.by_tensor.get(value.name or "", [])
        for t in existing:
            if t.uses is None and t.kind == "activation" and t.spec.dtype == spec.dtype:
                t.ops.append(node.name or "")
                return
        layout = self._activation_layout(spec, value)
        for t in existing:
            if t.uses is not None and t.spec == spec and t.layout == layout:
                t.uses.append((node.name or "", index))
                t.ops.append(node.name or "")
                return
        self._add(QuantTarget(self._new_key(value.name or ""), value.name or "", spec, layout, "activation",
                              uses=[(node.name or "", index)], ops=[node.name or ""]))

    def passthrough(self, node: ir.Node, keep_float: Callable[[ir.Value], bool] = lambda v: False) -> None:
        data = node.inputs[0] if node.inputs else None
        if data is None or not _is_float(data):
            return
        src = next((t for t in self.by_tensor.get(data.name or "", []) if t.uses is None), None)
        if src is None or not src.layout.per_tensor:
            return
        for out in node.outputs:
            if not out.uses() and not out.is_graph_output():
                continue
            if any(t.uses is None for t in self.by_tensor.get(out.name or "", [])) or keep_float(out):
                continue
            self._add(QuantTarget(self._new_key(out.name or ""), out.name or "", src.spec, src.layout, "activation",
                                  uses=None, shared_with=src.key, ops=[node.name or ""]))


def annotate(model: ir.Model, config: QuantizerConfig) -> QuantPlan:
    """Compute the QuantPlan for ``model`` under ``config`` (one walk over the nodes).

    Untyped values get their inferred element type first (:func:`qdq.graph.types.fill_missing_dtypes`), so
    int64 index math the file leaves untyped is not mistaken for float."""
    fill_missing_dtypes(model)
    graph = model.graph
    resolver = _ConfigResolver(config, graph)
    configs: dict[int, ModuleQuantizerConfig | None] = {}
    for node in graph:
        cfg, explicit = resolver.resolve(node)
        if node.metadata_props.get(KEEP_FLOAT):
            cfg = None  # inserted by an algorithm (a SmoothQuant Mul): computed in float, never quantized
        supported = node.op_type in OP_TABLE or node.op_type in PASSTHROUGH_OPS or node.op_type in ACTIVATION_OPS
        if explicit and cfg is not None and not supported and node.name in resolver.by_name:
            raise ConfigError(
                f"node '{node.name}' is a {node.op_type}, which qdq does not quantize; supported op types: "
                f"{', '.join(sorted(OP_TABLE))} (pass-through: {', '.join(sorted(PASSTHROUGH_OPS))})"
            )
        configs[id(node)] = cfg

    # Fusion: compute op -> (MatMul bias Add) -> activation, quantized once at the end.
    fused_out: dict[int, ir.Value] = {}
    absorbed: set[int] = set()
    for node in graph:
        if node.op_type not in OP_TABLE or configs[id(node)] is None or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        nxt = _single_consumer(out)
        if (node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add"
                and node.inputs[1] is not None and _is_constant(node.inputs[1])
                and any(v is not None and v is not out and _is_constant(v) for v in nxt.inputs)):
            absorbed.add(id(nxt))
            out = nxt.outputs[0]
            nxt = _single_consumer(out)
        if nxt is not None and nxt.op_type in ACTIVATION_OPS and configs[id(nxt)] is not None:
            absorbed.add(id(nxt))
            out = nxt.outputs[0]
        if out is not node.outputs[0]:
            fused_out[id(node)] = out

    outputs_float = config.float_graph_outputs
    float_islands = _float_islands(graph, configs, absorbed, fused_out, outputs_float)
    builder = _PlanBuilder(graph, ValueFacts(graph))
    for node in graph:
        cfg = configs[id(node)]
        if cfg is None or id(node) in absorbed or id(node) in float_islands:
            continue
        if _is_embedding_lookup(node):
            spec = cfg.spec_for("state", "weight", 0)
            if spec is not None:  # the table is a weight, stored 8-bit per row (ONNX Gather has no 4-bit type)
                builder.state(node, node.inputs[0], _table_spec(spec), "weight", "weight", axes=(0, 1))  # type: ignore[arg-type]
            continue
        if node.op_type in PASSTHROUGH_OPS:
            builder.passthrough(node, keep_float=lambda v: outputs_float and _only_float_consumers(
                v, configs, float_islands, True))
            continue
        info = OP_TABLE.get(node.op_type)
        if info is None or any(builder.facts.is_mask(o) for o in node.outputs):
            continue  # not a quantized op, or mask arithmetic (stays float, constants included)
        state_idx = {i: k for k, i in info.state.items()}
        for i, value in enumerate(node.inputs):
            if value is None or not _is_float(value):
                continue
            if i in state_idx and _is_constant(value):
                key = state_idx[i]
                alias = next((a for a, j in info.state_aliases.items() if j == i), None)
                spec = cfg.spec_for("state", key, i)
                if alias is not None and cfg.op_state_spec and alias in cfg.op_state_spec:
                    spec = cfg.op_state_spec[alias]
                if spec is not None:
                    builder.state(node, value, spec, "weight" if key == "weight" else "constant", key)
                continue
            if state_idx.get(i) == "bias":
                continue  # a computed bias stays float
            if info.data_inputs is not None and i not in info.data_inputs:
                continue
            spec = cfg.spec_for("input", port_name(node, i), i)
            if spec is None:
                continue
            if _is_constant(value):
                builder.state(node, value, spec, "constant")
            else:
                builder.input(node, i, value, spec)
        out = fused_out.get(id(node), node.outputs[0])
        spec = cfg.spec_for("output", port_name(node, 0, output=True), 0)
        float_ok = _FLOAT_OUTPUT_OK | (_GRAPH_OUTPUT_FLOAT_OK if out.is_graph_output() else frozenset())
        if node.op_type in float_ok and _only_float_consumers(out, configs, float_islands, outputs_float):
            continue  # e.g. FFN2 -> residual Add -> LayerNorm, or the logits Gemm: a pair there only adds error
        if spec is not None and _is_float(out):
            builder.output(node, out, spec)
    return builder.plan


#: Element-wise compute ops: integer kernels gain little, so their output is quantized only for a quantized reader.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Concat"})  # Concat: a ViT's class token joining the patches
#: Compute ops whose output may stay float when only float ops read it: the element-wise ones, and MatMul /
#: Gemm, which onnxruntime still runs on integers from quantized inputs (MatMulIntegerToFloat). Conv keeps its
#: output pair: onnxruntime fuses a QDQ Conv into QLinearConv only with one.
_FLOAT_OUTPUT_OK = _ELEMENTWISE | {"MatMul", "Gemm"}
#: With ``float_graph_outputs``, a graph output of these ops stays float too (cheap in float: pooling, means).
_GRAPH_OUTPUT_FLOAT_OK = frozenset(OP_TABLE) - {"Conv", "ConvTranspose"}


def _only_float_consumers(value: ir.Value, configs: dict[int, ModuleQuantizerConfig | None],
                          float_islands: AbstractSet[int] = frozenset(), outputs_float: bool = False,
                          _depth: int = 0) -> bool:
    """True when no consumer of ``value`` reads it quantized (all are float ops such as LayerNormalization,
    element-wise ops of a float island, or pass-through ops - Gather, Reshape, ... - whose outputs only reach
    such ops). A graph output is a quantized reader unless ``outputs_float`` (``float_graph_outputs``: the
    caller reads the model's outputs as float)."""
    if value.is_graph_output() and not outputs_float:
        return False
    if not value.uses() and not value.is_graph_output():
        return False
    for use in value.uses():
        node = use.node
        op = node.op_type
        if id(node) in float_islands:
            continue
        if op in PASSTHROUGH_OPS and configs.get(id(node)) is not None and _depth < 8:
            if all(_only_float_consumers(o, configs, float_islands, outputs_float, _depth + 1) for o in node.outputs):
                continue  # e.g. the class-token Gather before a ViT's final LayerNorm
            return False
        quantizing = op in OP_TABLE or op in PASSTHROUGH_OPS or op in ACTIVATION_OPS
        if quantizing and configs.get(id(node)) is not None:
            return False
    return True


def _float_islands(graph: ir.Graph, configs: dict[int, ModuleQuantizerConfig | None], absorbed: set[int],
                   fused_out: dict[int, ir.Value], outputs_float: bool = False) -> set[int]:
    """Element-wise nodes computed in float: their output only reaches float ops (directly or through other
    such nodes), so quantizing their inputs buys no integer kernel and only adds error. A transformer's residual
    Add feeding LayerNorm is one; its inputs (the FFN's output with 50-100x outlier channels, the previous
    LayerNorm's output) then stay float unless another reader quantizes them. One reverse pass."""
    islands: set[int] = set()
    for node in reversed(list(graph)):
        if (node.op_type not in _ELEMENTWISE or configs[id(node)] is None or id(node) in absorbed
                or len(node.outputs) != 1):
            continue
        out = fused_out.get(id(node), node.outputs[0])
        if _only_float_consumers(out, configs, islands, outputs_float):
            islands.add(id(node))
    return islands


def _table_spec(spec: QuantizationSpec) -> QuantizationSpec:
    """An embedding table's spec: the weight spec when it is 8-bit integer per tensor / per row, else int8 per row
    (symmetric): Gather reads 8-bit tables only, and only whole rows are gathered."""
    kind = spec.granularity.to_dict()["type"]
    if spec.dtype in (QDType.INT8, QDType.UINT8) and kind in ("per_tensor", "per_channel"):
        return spec.replace(granularity=PerChannelGranularity()) if kind == "per_channel" else spec
    return spec.replace(dtype=QDType.INT8, granularity=PerChannelGranularity(), qscheme=QScheme.SYMMETRIC)


def _is_embedding_lookup(node: ir.Node) -> bool:
    """Gather of rows of a constant float 2-D table (a token / position embedding)."""
    if node.op_type != "Gather" or not node.inputs or node.inputs[0] is None:
        return False
    table = node.inputs[0]
    if table.const_value is None or len(table.const_value.shape) != 2 or not _is_float(table):
        return False
    return (node.attributes.get_int("axis") or 0) == 0


def _single_consumer(value: ir.Value) -> ir.Node | None:
    if value.is_graph_output():
        return None
    users = {id(u.node): u.node for u in value.uses()}
    return next(iter(users.values())) if len(users) == 1 else None
