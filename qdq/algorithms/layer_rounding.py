"""Layer-wise weight rounding from input Hessians: what GPTQ and AdaRound share.

A rounding algorithm sees, per layer (a MatMul / Gemm / Conv 2-D weight the plan quantizes to an integer
grid), the weight as a matrix ``[groups, outputs, inputs]`` (im2col order for Conv), the input Hessian
``H = XᵀX / n`` streamed from the calibration data (``K x K`` per group, float64) and the per-element grid
(scale, zero point; the planned calculator's on the original weight). It returns integer codes; this module
writes their dequantized values into the float model, pins the grid (so the quantizer stores exactly those
codes) and, with ``bias_correction``, adds the mean output error ``(W - Q) E[x]`` to the layer's bias.

Statistics stream: onnxruntime passes fetch the layer inputs batch by batch (as many layers per pass as keep
one batch's fetched inputs under ``fetch_mb``) and only the Hessians and input sums are kept. Inputs are those
of the float model; ``sequential`` instead runs one pass per layer input, on the model rounded so far.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from qdq.algorithms import Algorithm, AlgorithmContext
from qdq.calibration.base import QParamsCalculatorBase
from qdq.calibration.pinned import PinnedQParams
from qdq.errors import ConfigError, DataError
from qdq.passes._qdq_nodes import add_initializer
from qdq.plan import ALL_USES, QuantPlan, QuantTarget
from qdq.progress import progress_bar
from qdq.qparams import QParams, quant_range

__all__ = ["LayerRounding", "weighted_error"]

logger = logging.getLogger(__name__)

_FLOAT = (None, ir.DataType.FLOAT)


def _flag(node: ir.Node, name: str) -> bool:
    value: int = node.attributes.get_int(name, 0)
    return value != 0


@dataclasses.dataclass
class _Layer:
    node: ir.Node
    target: QuantTarget
    weight: ir.Value
    x: ir.Value
    groups: int = 1  # Conv groups
    hessian: np.ndarray | None = None  # [groups, K, K], float64, sum of x xᵀ
    sums: np.ndarray | None = None  # [groups, K], float64, sum of x (bias correction)
    rows: int = 0

    @functools.cached_property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (read once: im2col asks for the kernel size per sample)."""
        return tuple(self.w.shape)

    @property
    def w(self) -> np.ndarray:
        return self.weight.const_value.numpy()  # type: ignore[union-attr]

    # weight <-> [groups, outputs, inputs] (inputs in im2col order for Conv)
    def to_matrix(self, a: np.ndarray) -> np.ndarray:
        if self.node.op_type == "Conv":
            return a.reshape(self.groups, a.shape[0] // self.groups, -1)
        if self.node.op_type == "Gemm" and _flag(self.node, "transB"):
            return a[None]
        return a.T[None]

    def from_matrix(self, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.node.op_type == "Conv":
            return m.reshape(shape)
        if self.node.op_type == "Gemm" and _flag(self.node, "transB"):
            return m[0]
        return m[0].T

    def observe(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if self.node.op_type == "Conv":
            for sample in x:  # one image at a time: im2col of a batch would multiply its memory by kh*kw
                p = self._patches(sample)  # [rows, groups, K]
                if self.groups > 1:
                    part = np.einsum("rgi,rgj->gij", p, p, optimize=True)
                else:
                    part = (p[:, 0].T @ p[:, 0])[None]
                self._add(part, p.sum(axis=0), p.shape[0])
            return
        x2 = x.reshape(-1, x.shape[-1])
        self._add((x2.T @ x2)[None], x2.sum(axis=0)[None], x2.shape[0])

    def _add(self, part: np.ndarray, sums: np.ndarray, rows: int) -> None:
        part, sums = part.astype(np.float64), sums.astype(np.float64)
        self.hessian = part if self.hessian is None else self.hessian + part
        self.sums = sums if self.sums is None else self.sums + sums
        self.rows += rows

    def bias(self, model: ir.Model) -> ir.Value | None:
        """The constant bias added to this layer's output channels (Conv/Gemm input 2, or the Add after a
        MatMul); a missing Conv bias is created (zeros)."""
        n_out = self.shape[0] if self.node.op_type == "Conv" or _flag(self.node, "transB") else self.shape[-1]
        if self.node.op_type in ("Conv", "Gemm"):
            b = self.node.inputs[2] if len(self.node.inputs) > 2 else None
            if b is None and self.node.op_type == "Conv":
                b = add_initializer(model.graph, f"{self.node.name}_bias", np.zeros(n_out, np.float32))
                self.node.resize_inputs(3)
                self.node.replace_input_with(2, b)
        else:
            out = self.node.outputs[0]
            uses = list(out.uses())
            if len(uses) != 1 or uses[0].node.op_type != "Add" or out.is_graph_output():
                return None
            add = uses[0].node
            b = add.inputs[1 - uses[0].idx]
        if b is None or b.const_value is None or b.const_value.dtype != ir.DataType.FLOAT:
            return None
        if b.const_value.size != n_out or len(b.uses()) != 1:
            return None
        return b

    def _patches(self, x: np.ndarray) -> np.ndarray:
        """im2col of one [C, H, W] input: [out_h * out_w, groups, C/groups * kh * kw]."""
        attrs = self.node.attributes
        _, _, kh, kw = self.shape
        sh, sw = attrs.get_ints("strides", (1, 1))
        dh, dw = attrs.get_ints("dilations", (1, 1))
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        pads = list(attrs.get_ints("pads", (0, 0, 0, 0)))
        auto = attrs.get_string("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, stride, extent in ((x.shape[1], sh, eh), (x.shape[2], sw, ew)):
                total = max((-(-size // stride) - 1) * stride + extent - size, 0)
                small, large = total // 2, total - total // 2
                begin.append(small if auto == "SAME_UPPER" else large)
                end.append(large if auto == "SAME_UPPER" else small)
            pads = begin + end
        elif auto == "VALID":
            pads = [0, 0, 0, 0]
        xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(1, 2))[:, ::sh, ::sw, ::dh, ::dw]
        oh, ow = win.shape[1:3]
        return np.ascontiguousarray(win.transpose(1, 2, 0, 3, 4)).reshape(oh * ow, self.groups, -1)


def _find_layers(model: ir.Model, plan: QuantPlan) -> tuple[list[_Layer], list[str]]:
    """The weights GPTQ can round (integer-quantized, read by one MatMul/Gemm/Conv 2-D), and why others not."""
    layers: list[_Layer] = []
    skipped: list[str] = []
    initializers = model.graph.initializers
    for t in plan.by_kind("weight"):
        value = initializers.get(t.tensor)
        if value is None or value.const_value is None:
            continue
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].idx != 1 or uses[0].node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        node = uses[0].node
        if t.uses is not ALL_USES and (node.name, 1) not in t.uses:
            continue
        reason = None
        shape = value.const_value.shape
        if t.spec.dtype.is_float:
            reason = f"{t.spec.dtype.value} grid"
        elif value.const_value.dtype != ir.DataType.FLOAT:
            reason = "not a float32 weight"
        elif node.op_type == "Conv" and len(shape) != 4:
            reason = "not a 2-D Conv"
        elif node.op_type != "Conv" and len(shape) != 2:
            reason = "not a 2-D weight"
        elif node.op_type == "Gemm" and _flag(node, "transA"):
            reason = "Gemm with transA"
        x = node.inputs[0]
        if reason is None and (x is None or x.dtype not in _FLOAT):
            reason = "input is not float32"
        if reason is not None:
            skipped.append(f"{t.tensor} ({reason})")
            continue
        assert x is not None
        groups = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
        layers.append(_Layer(node, t, value, x, groups))
    return layers, skipped


def weighted_error(e: np.ndarray, h: np.ndarray) -> float:
    """``sum_g tr(E_g H_g E_gᵀ)``: the layer's output error on the calibration inputs (up to 1/n)."""
    return float(np.einsum("goi,gij,goj->", e, h, e, optimize=True))


class LayerRounding(Algorithm):
    """Base of Hessian-driven rounding algorithms: subclasses implement :meth:`codes`."""

    SHARED_OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {
        "sequential": (bool, False), "bias_correction": (bool, True), "fetch_mb": (int, 128)}

    def validate(self) -> None:
        if self.options["fetch_mb"] < 1:
            raise ConfigError(f"{self.name} fetch_mb must be >= 1, got {self.options['fetch_mb']}")

    def applies_to(self, model: ir.Model) -> bool:
        return any(n.op_type in ("MatMul", "Gemm", "Conv") and len(n.inputs) > 1 and n.inputs[1] is not None
                   and n.inputs[1].const_value is not None for n in model.graph)

    def codes(self, w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: float,
              qmax: float) -> np.ndarray:
        """Integer codes for ``w`` [groups, outputs, inputs] (grid per element, Hessians [groups, K, K])."""
        raise NotImplementedError

    def apply(self, model: ir.Model, batches: Callable[[], Iterable[Mapping[str, Any]]],
              context: AlgorithmContext | None = None) -> list[str]:
        if context is None:
            raise ConfigError(f"{self.name} needs the quantization plan: run it through Quantizer.apply_algorithms")
        layers, skipped = _find_layers(model, context.plan)
        if not layers:
            return [f"{self.name}: no integer-quantized MatMul/Gemm/Conv weight; nothing rounded"
                    + (f" (skipped: {', '.join(skipped[:5])})" if skipped else "")]
        rounds = self._rounds(model, layers, batches)
        first = {id(group[0]): group for group in rounds}
        before = after = 0.0
        count = 0
        ordered = [ly for group in rounds for ly in group]
        for ly in progress_bar(ordered, desc=self.name, unit="layer", disable=not context.progress):
            if id(ly) in first:  # one statistics pass per round, on the model as rounded so far
                count = self._statistics(model, first[id(ly)], batches)
            before_i, after_i = self._round(model, ly, context)
            before, after = before + before_i, after + after_i
            ly.hessian = None
        ratio = after / before if before > 0 else 1.0
        note = (f"{self.name}: {len(layers)} weights rounded over {count} batches; Hessian-weighted output error "
                f"{ratio:.2f}x of round-to-nearest" + (f"; skipped {len(skipped)}: {', '.join(skipped[:5])}"
                                                     if skipped else ""))
        logger.info(note)
        return [note]

    def _rounds(self, model: ir.Model, layers: list[_Layer],
                batches: Callable[[], Iterable[Mapping[str, Any]]]) -> list[list[_Layer]]:
        """Layers in statistics passes: ``sequential``, one pass per input tensor (graph order; q, k, v share
        one), each after the layers before it are rounded; else as few passes as keep the fetched inputs of one
        batch under ``fetch_mb`` (sized on one sample of the first batch)."""
        groups: dict[str, list[_Layer]] = {}
        for ly in layers:
            groups.setdefault(ly.x.name or "", []).append(ly)
        if self.options["sequential"] or len(groups) == 1:
            return list(groups.values())
        first = next(iter(batches()), None)
        if first is None:
            raise DataError(f"{self.name} needs calibration data: the batches are empty")
        from qdq.model_inputs import model_inputs
        from qdq.session import make_session, run_batched

        signature = model_inputs(model)
        first = {k: np.asarray(v) for k, v in dict(first).items()}
        per_batch = signature.batch_len(first)
        if per_batch is None:
            return list(groups.values())  # no common batch axis: one pass per input
        sample = signature.split(first, 0, 1)
        inputs = {v.name for v in model.graph.inputs}
        fetch = [name for name in groups if name not in inputs]

        session = make_session(model, level="none", extra_outputs=fetch, arena=False,
                               label=f"model ({self.name} sizing)")
        outs = run_batched(session, sample, signature, fetch)  # a static batch runs padded to its size
        nbytes = dict(zip(fetch, (a.nbytes * per_batch for a in outs), strict=True))
        del session
        budget = self.options["fetch_mb"] * 2 ** 20
        rounds: list[list[_Layer]] = []
        used = budget + 1
        for name, group in groups.items():
            size = nbytes.get(name, 0)
            if used + size > budget:
                rounds.append([])
                used = 0
            rounds[-1].extend(group)
            used += size
        return rounds

    def _statistics(self, model: ir.Model, layers: list[_Layer], batches: Callable[[], Iterable[Mapping[str, Any]]]) -> int:
        """Stream the calibration batches once, accumulating every layer's input Hessian; returns the batch count."""
        from qdq.model_inputs import model_inputs
        from qdq.session import make_session, run_batched

        inputs = {v.name for v in model.graph.inputs}
        fetch = sorted({ly.x.name or "" for ly in layers if ly.x.name not in inputs})
        session = make_session(model, level="none", extra_outputs=fetch, arena=False,
                               label=f"model ({self.name} statistics)")
        chunked = model_inputs(model)  # a static batch runs in chunks of its size
        count = 0
        for feeds in batches():
            feeds = dict(feeds)
            values = dict(zip(fetch, run_batched(session, feeds, chunked, fetch), strict=True)) if fetch else {}
            for ly in layers:
                x = values[ly.x.name] if ly.x.name in values else feeds[ly.x.name or ""]
                if not np.all(np.isfinite(x)):
                    raise DataError(f"{self.name}: the input of {ly.node.name} has NaN/Inf on the calibration data")
                ly.observe(x)
            count += 1
        if count == 0:
            raise DataError(f"{self.name} needs calibration data: the batches are empty")
        return count

    def _round(self, model: ir.Model, ly: _Layer, context: AlgorithmContext) -> tuple[float, float]:
        t = ly.target
        w = ly.w.astype(np.float32)
        calc = QParamsCalculatorBase.create(t.spec, t.layout, is_weight=True)
        calc.observe(w)
        qp = calc.qparams()
        scale = np.broadcast_to(t.layout.expand(qp.scale, w.shape), w.shape).astype(np.float32)
        zp = np.broadcast_to(t.layout.expand(qp.zero_point, w.shape), w.shape).astype(np.float32)
        qmin, qmax = quant_range(t.spec.dtype, t.spec.qscheme)
        assert ly.hessian is not None
        h: np.ndarray = ly.hessian / max(ly.rows, 1)
        wm, sm, zm = ly.to_matrix(w), ly.to_matrix(scale), ly.to_matrix(zp)
        codes = self.codes(wm, h, sm, zm, qmin, qmax)
        deq = ((codes.astype(np.float32) - zm) * sm).astype(np.float32)  # DequantizeLinear's float32 arithmetic
        rtn = (np.clip(np.rint(wm / sm) + zm, qmin, qmax) - zm) * sm
        errors = (weighted_error(wm - rtn, h), weighted_error(wm - deq, h))
        originals = context.rounded.setdefault(ly.weight.name or "", {})
        originals.setdefault(ly.weight.name or "", w)  # astype above made it a copy
        ly.weight.const_value = ir.tensor(ly.from_matrix(deq, w.shape), name=ly.weight.name)
        if self.options["bias_correction"] and ly.sums is not None and (b := ly.bias(model)) is not None:
            mean = ly.sums / max(ly.rows, 1)  # [groups, K]
            shift = np.einsum("gok,gk->go", wm.astype(np.float64) - deq, mean).reshape(-1)
            data = b.const_value.numpy()  # type: ignore[union-attr]
            originals.setdefault(b.name or "", data)  # the bias gets a new tensor below; this one is not written
            b.const_value = ir.tensor((data.astype(np.float64) + shift.reshape(data.shape)).astype(np.float32),
                                      name=b.name)
        context.pinned[t.tensor] = PinnedQParams(t.spec, t.layout, QParams(qp.scale.copy(), qp.zero_point.copy()),
                                                 by=self.name)
        return errors
