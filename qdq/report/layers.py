"""Per-layer error of a quantized model: isolated (only this layer quantized, FP32 inputs) and accumulated.

A *layer* is a compute node of the quantized model that reads a dequantized value (a DequantizeLinear output,
or a QuantizeLinear output read by an integer kernel such as MatMulIntegerToFloat); it is named by its node
name and op type, as configs name ops, and measured at its first output, a tensor the FP32 model has too.

Isolated error runs in one extra model: the FP32 model plus, for every layer, a copy of the quantized node
whose activation inputs are re-quantized from the FP32 tensors with the layer's own qparams (weights and
constants copied). Its output against the FP32 node's output is the error this layer alone adds. Accumulated
error is the quantized model's own tensor against the FP32 one (every layer before it quantized).

The activation tensors themselves (each QuantizeLinear's float input, in the FP32 model) get their qparams,
range, clipping ratio, quantization SQNR and a running histogram. Everything streams: running sums per batch.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from qdq.dtypes import QDType
from qdq.metrics import Sqnr
from qdq.numerics import fake_quantize

__all__ = ["ActivationStats", "Layer", "LayerPlan", "plan_layers"]

logger = logging.getLogger(__name__)

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_DOMAINS = ("", "ai.onnx", "com.microsoft")
#: integer kernels that read QuantizeLinear outputs directly (qdq's onnxruntime finalize makes them)
_INTEGER = frozenset({"MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QLinearConv", "QGemm"})
#: ops that only move or reshape quantized values (no arithmetic error of their own)
_MOVES = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                    "Expand", "Shape", "Size", "Cast"})
_PREFIX = "qdq_iso/"
HIST_BINS = 48


@dataclasses.dataclass
class Layer:
    name: str  #: node name (what op_name_configs use)
    op_type: str
    output: str  #: the measured tensor (first output), in both models
    isolated: str  #: the isolated copy's output in the analysis model
    #: node and tensor names onnxruntime may give this layer's kernels (its fused elementwise successors)
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass
class ActivationStats:
    """One quantized activation: its qparams and, streamed over the data, what they do to the FP32 tensor."""

    tensor: str
    node: str  #: the QuantizeLinear
    qdtype: QDType
    scale: float
    zero_point: int
    count: int = 0
    clipped: int = 0
    error: Sqnr = dataclasses.field(default_factory=Sqnr)  #: the tensor against its QDQ pair's output
    hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(HIST_BINS + 2, np.int64))
    minimum: float = np.inf
    maximum: float = -np.inf

    @property
    def dtype(self) -> str:
        return self.qdtype.value

    @property
    def lo(self) -> float:
        """The representable range."""
        return (self.qdtype.qmin - self.zero_point) * self.scale

    @property
    def hi(self) -> float:
        return (self.qdtype.qmax - self.zero_point) * self.scale

    @property
    def edges(self) -> np.ndarray:
        pad = 0.25 * max(self.hi - self.lo, self.scale)
        return np.linspace(self.lo - pad, self.hi + pad, HIST_BINS + 1)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        self.error.update(x, fake_quantize(x, np.array(self.scale, np.float32), np.array(self.zero_point, np.int32),
                                           self.qdtype))
        half = 0.5 * self.scale
        self.clipped += int(np.count_nonzero((x < self.lo - half) | (x > self.hi + half)))
        self.count += x.size
        if x.size:
            self.minimum, self.maximum = min(self.minimum, float(x.min())), max(self.maximum, float(x.max()))
        edges = self.edges
        counts, _ = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)
        self.hist[1:-1] += counts
        self.hist[0] += int(np.count_nonzero(x < edges[0]))
        self.hist[-1] += int(np.count_nonzero(x > edges[-1]))

    @property
    def sqnr_db(self) -> float:
        return self.error.db

    @property
    def clip_ratio(self) -> float:
        return self.clipped / self.count if self.count else 0.0


@dataclasses.dataclass
class LayerPlan:
    """The analysis model (FP32 + isolated copies) and what to fetch from it and from the quantized model."""

    model: onnx.ModelProto
    layers: list[Layer]
    activations: list[ActivationStats]
    skipped: list[str]  #: layers that could not be isolated, with why


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.constants = {o: n for n in g.node if n.op_type == "Constant" for o in n.output}

    def _tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.inits:
            return self.inits[name]
        node = self.constants.get(name)
        return next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None

    def array(self, name: str) -> np.ndarray | None:
        t = self._tensor(name)
        return None if t is None else numpy_helper.to_array(t)

    def data_type(self, name: str) -> int:
        t = self._tensor(name)
        return 0 if t is None else t.data_type


def _activation_stats(q: onnx.NodeProto, graph: _Graph, reference: str) -> ActivationStats | None:
    scale = graph.array(q.input[1])
    zp_name = q.input[2] if len(q.input) > 2 else ""
    zp = graph.array(zp_name) if zp_name else None
    if scale is None or scale.size != 1 or (zp_name and zp is None):
        return None  # per-channel activations: not summarised here
    stored = graph.data_type(zp_name) if zp_name else next((a.i for a in q.attribute if a.name == "output_dtype"), 0)
    try:
        qdtype = QDType.from_ir(ir.DataType(stored)) if stored else QDType.UINT8
    except (KeyError, ValueError):
        return None
    if qdtype.is_float:
        return None  # float8 grids
    zero = int(zp.reshape(())) if zp is not None else 0
    return ActivationStats(reference, q.name, qdtype, float(scale.reshape(())), zero)


_FUSABLE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Add", "Mul", "Gelu",
                      "Tanh", "Erf"})


def _aliases(tensor: str, readers: dict[str, list[onnx.NodeProto]]) -> tuple[str, ...]:
    """``tensor`` and the outputs / names of up to two single-reader elementwise ops after it in the FP32 model:
    onnxruntime names a fused kernel (Conv+Relu, NCHWc) after the last tensor it produces."""
    names = [tensor]
    for _ in range(2):
        nxt = readers.get(tensor, [])
        if len(nxt) != 1 or nxt[0].op_type not in _FUSABLE:
            break
        tensor = nxt[0].output[0]
        names += [nxt[0].name, tensor]
    return tuple(n for n in names if n)


def plan_layers(fp32: onnx.ModelProto, quant: onnx.ModelProto) -> LayerPlan:
    """Find the layers of ``quant`` and build the analysis model on a copy of ``fp32``."""
    g = _Graph(quant)
    fp_values = {v.name for v in fp32.graph.input} | {o for n in fp32.graph.node for o in n.output}
    fp_values |= {t.name for t in fp32.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    new_inits: dict[str, onnx.TensorProto] = {}
    new_nodes: list[onnx.NodeProto] = []
    requant: dict[str, str] = {}  # quantized-model Q output -> its re-quantization of the FP32 tensor

    def const(name: str) -> str | None:
        iso = _PREFIX + name
        if iso in new_inits:
            return iso
        arr = g.array(name)
        if arr is None:
            return None
        t = g.inits[name] if name in g.inits else numpy_helper.from_array(arr)
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = iso
        new_inits[iso] = copy
        return iso

    def reference(q: onnx.NodeProto) -> str:
        meta = {p.key: p.value for p in q.metadata_props}
        return meta.get("qdq.tensor", q.input[0])

    def requantized(q: onnx.NodeProto) -> str | None:
        """The output of ``q`` computed from the FP32 tensor it quantizes (one copy per Q node)."""
        if q.output[0] in requant:
            return requant[q.output[0]]
        ref = reference(q) if reference(q) in fp_values else float_copy(q.input[0], 3)
        if ref is None:
            return None
        params = [const(i) if i else "" for i in q.input[1:]]
        if any(p is None for p in params):
            return None
        out = _PREFIX + q.output[0]
        node = helper.make_node("QuantizeLinear", [ref, *params], [out], name=_PREFIX + q.name)  # type: ignore[list-item]
        node.attribute.extend(q.attribute)
        new_nodes.append(node)
        requant[q.output[0]] = out
        return out

    emitted: set[str] = set()

    def copy_node(p: onnx.NodeProto, inputs: list[str]) -> None:
        """``p`` in the analysis model, reading ``inputs``, its outputs prefixed."""
        node = helper.make_node(p.op_type, inputs, [_PREFIX + o for o in p.output], name=_PREFIX + p.name,
                                domain=p.domain)
        node.attribute.extend(p.attribute)
        new_nodes.append(node)
        emitted.update(node.output)

    def float_copy(name: str, depth: int) -> str | None:
        """A float tensor the quantized model computes and the FP32 model lacks (a SmoothQuant Mul of an FP32
        tensor): its producing nodes copied, up to ``depth`` deep, from FP32 tensors and constants."""
        if name in fp_values:
            return name
        if name in g.inits or name in g.constants:
            return const(name)
        p = g.producer.get(name)
        if depth == 0 or p is None or p.op_type in _QDQ or p.domain not in _DOMAINS:
            return None
        out = _PREFIX + name
        if out not in emitted:
            ins = [float_copy(x, depth - 1) if x else "" for x in p.input]
            if any(x is None for x in ins):
                return None
            copy_node(p, ins)  # type: ignore[arg-type]
        return out

    def iso_input(name: str) -> str | None:
        if not name:
            return ""
        if name in g.inits or name in g.constants:
            return const(name)
        p = g.producer.get(name)
        if p is not None and p.op_type == "QuantizeLinear":
            return requantized(p)
        if p is not None and p.op_type == "DequantizeLinear":
            src = p.input[0]
            srcp = g.producer.get(src)
            if src in g.inits or src in g.constants:
                a = const(src)
            elif srcp is not None and srcp.op_type == "QuantizeLinear":
                a = requantized(srcp)
            else:
                return None  # e.g. Q -> Reshape -> DQ: not a pair this layer owns
            params = [const(i) if i else "" for i in p.input[1:]]
            if a is None or any(x is None for x in params):
                return None
            out = _PREFIX + name
            if out not in emitted:
                copy_node(p, [a, *params])  # type: ignore[list-item]
            return out
        if p is not None and p.op_type in _MOVES and p.domain in _DOMAINS:  # Q -> Reshape/Transpose -> DQ or kernel
            out = _PREFIX + name
            if out not in emitted:
                moved = [iso_input(x) for x in p.input]
                if any(x is None for x in moved):
                    return None
                copy_node(p, moved)  # type: ignore[arg-type]
            return out
        return name if name in fp_values else None

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in quant.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    fp_readers: dict[str, list[onnx.NodeProto]] = {}
    for n in fp32.graph.node:
        for x in n.input:
            fp_readers.setdefault(x, []).append(n)
    graph_outputs = {o.name for o in quant.graph.output}
    layers: list[Layer] = []
    skipped: list[str] = []
    for i, node in enumerate(quant.graph.node):
        if node.op_type in _QDQ or node.op_type in _MOVES or node.op_type == "Constant" or node.domain not in _DOMAINS:
            continue
        readers = [g.producer.get(x) for x in node.input if x]
        quantized = node.op_type in _INTEGER or any(p is not None and p.op_type == "DequantizeLinear" for p in readers)
        if not quantized:
            continue
        name = node.name or f"{node.op_type}_{i}"
        out = node.output[0]
        if out not in fp_values:  # a quantized graph output: qdq renamed the float tensor, its Q records the name
            q = next((c for c in consumers.get(out, []) if c.op_type == "QuantizeLinear"), None)
            out = reference(q) if q is not None else out
            if q is not None and out not in fp_values:  # finalized (metadata stripped): the pair's DQ has the name
                dq = next((c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"), None)
                out = dq.output[0] if dq is not None and dq.output[0] in graph_outputs else out
        if out not in fp_values:
            skipped.append(f"{name} (output {out} not in the FP32 model)")
            continue
        inputs = [iso_input(x) for x in node.input]
        if any(x is None for x in inputs):
            skipped.append(f"{name} (an input is not a Q/DQ pair of an FP32 tensor)")
            continue
        outputs = [_PREFIX + (out if k == 0 else o) for k, o in enumerate(node.output)]
        copy = helper.make_node(node.op_type, inputs, outputs, name=_PREFIX + name,  # type: ignore[arg-type]
                                domain=node.domain)
        copy.attribute.extend(node.attribute)
        new_nodes.append(copy)
        layers.append(Layer(name, node.op_type, out, _PREFIX + out, _aliases(out, fp_readers)))
    acts: list[ActivationStats] = []
    seen: set[str] = set()
    for node in quant.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in g.inits or node.input[0] in g.constants:
            continue
        ref = reference(node)
        if ref in seen or ref not in fp_values:
            continue
        stats = _activation_stats(node, g, ref)
        if stats is not None:
            seen.add(ref)
            acts.append(stats)
    model.graph.initializer.extend(new_inits.values())
    model.graph.node.extend(new_nodes)
    opsets = {o.domain: o.version for o in model.opset_import}
    for o in quant.opset_import:
        if o.domain not in opsets:
            model.opset_import.append(helper.make_opsetid(o.domain, o.version))
        elif o.domain in ("", "ai.onnx") and o.version > opsets[o.domain]:
            for imp in model.opset_import:
                if imp.domain == o.domain:
                    imp.version = o.version
    return LayerPlan(model, layers, acts, skipped)
