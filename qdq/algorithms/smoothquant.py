"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights that read them.

A transformer's LayerNorm outputs carry a few channels 50-100x larger than the rest; per-tensor int8 spends
its whole grid on them. For an activation ``X`` read by MatMul/Gemm weights ``W_k`` (``X @ W_k``), per input
channel ``j``::

    s_j = max|X_j| ** alpha / max_k max|W_k[j, :]| ** (1 - alpha)      X' = X / s     W_k' = diag(s) W_k

leaves every product unchanged in float and flattens ``X``'s channels (``alpha`` moves more of the range into
the weights, which are quantized per output channel). ``max|X_j|`` streams over the calibration batches
(running max, one onnxruntime pass, nothing stored). ``1/s`` is folded into the producing LayerNormalization's
scale and bias when the LayerNorm output has no other reader; otherwise a ``Mul`` by ``1/s`` is inserted
before the MatMuls only (marked ``qdq.keep_float``: the planner never quantizes it, so the smoothed tensor is
what gets quantized). ``targets``: ``norm`` (default) smooths activations produced by LayerNormalization /
RMS-style norms, ``all`` every activation read by constant-weight MatMul/Gemm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from qdq.algorithms import Algorithm, AlgorithmContext, register_algorithm
from qdq.errors import ConfigError, DataError
from qdq.passes.annotate import KEEP_FLOAT

__all__ = ["KEEP_FLOAT", "SmoothQuant"]

logger = logging.getLogger(__name__)

_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})


class _Reader:
    """One MatMul/Gemm reading the smoothed activation as its input 0 through a constant 2-D weight."""

    def __init__(self, node: ir.Node) -> None:
        self.node = node
        self.rows = not (node.op_type == "Gemm" and (node.attributes.get_int("transB") or 0))  # weight is [in, out]

    @property
    def weight(self) -> ir.Value:
        value = self.node.inputs[1]
        assert value is not None
        return value

    def channel_absmax(self) -> np.ndarray:
        w = np.abs(self.weight.const_value.numpy().astype(np.float32))  # type: ignore[union-attr]
        return w.max(axis=1) if self.rows else w.max(axis=0)


def _reader(node: ir.Node, value: ir.Value) -> _Reader | None:
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[0] is not value:
        return None
    if node.op_type == "Gemm" and (node.attributes.get_int("transA") or 0):
        return None
    w = node.inputs[1]
    if w is None or w is value or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    if w.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return None
    return _Reader(node)


@register_algorithm("smoothquant")
class SmoothQuant(Algorithm):
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {"alpha": (float, 0.7), "targets": (str, "norm")}

    def validate(self) -> None:
        if not 0.0 <= self.options["alpha"] <= 1.0:
            raise ConfigError(f"smoothquant alpha must be in [0, 1], got {self.options['alpha']}")
        if self.options["targets"] not in ("norm", "all"):
            raise ConfigError(f"smoothquant targets must be 'norm' or 'all', got {self.options['targets']!r}")

    def groups(self, model: ir.Model) -> dict[str, tuple[ir.Value, list[_Reader]]]:
        """Activation name -> (value, its MatMul/Gemm readers) to smooth."""
        out: dict[str, tuple[ir.Value, list[_Reader]]] = {}
        for node in model.graph:
            for value in node.outputs:
                if value.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16) or not value.name:
                    continue
                if self.options["targets"] == "norm" and node.op_type not in _NORMS:
                    continue
                readers = [r for u in value.uses() if (r := _reader(u.node, value)) is not None]
                if readers:
                    out[value.name] = (value, readers)
        return out

    def applies_to(self, model: ir.Model) -> bool:
        return bool(self.groups(model))

    def apply(self, model: ir.Model, batches: Callable[[], Iterable[Mapping[str, Any]]],
              context: AlgorithmContext | None = None) -> list[str]:
        from qdq.model_inputs import model_inputs
        from qdq.session import make_session, run_batched

        groups = self.groups(model)
        if not groups:
            return ["smoothquant: no MatMul/Gemm reads a " + ("normalized " if self.options["targets"] == "norm"
                                                              else "") + "activation; nothing smoothed"]
        fetch = list(groups)
        session = make_session(model, level="none", extra_outputs=fetch, label="model (smoothquant pass)")
        inputs = model_inputs(model)  # a static batch runs in chunks of its size
        amax: dict[str, np.ndarray] = {}
        count = 0
        for feeds in batches():
            results = dict(zip(fetch, run_batched(session, dict(feeds), inputs, fetch), strict=True))
            for key in groups:
                x = np.abs(np.asarray(results[key], np.float32))
                m = x.reshape(-1, x.shape[-1]).max(axis=0) if x.size else np.zeros(x.shape[-1], np.float32)
                amax[key] = m if key not in amax else np.maximum(amax[key], m)
            count += 1
        if count == 0:
            raise DataError("smoothquant needs calibration data: the batches are empty")
        bad = [k for k, a in amax.items() if not np.all(np.isfinite(a))]
        if bad:
            raise DataError(f"smoothquant: activations {bad[:5]} have NaN/Inf on the calibration data; fix the data")
        alpha = self.options["alpha"]
        folded = inserted = 0
        for key, (value, readers) in groups.items():
            wmax = np.max([r.channel_absmax() for r in readers], axis=0)
            a = amax[key]
            if a.shape != wmax.shape:
                logger.debug("smoothquant: %s has %s channels, its weights %s: skipped", key, a.shape, wmax.shape)
                continue
            ok = (a > 0) & (wmax > 0)
            scale = np.ones_like(a)
            scale[ok] = a[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
            scale = np.clip(scale, 1e-5, 1e5).astype(np.float32)
            if self._fold_into_norm(value, readers, scale):
                folded += 1
            else:
                self._insert_mul(model, value, readers, scale)
                inserted += 1
            for r in readers:
                _scale_weight(model, r, scale)
        note = (f"smoothquant (alpha {alpha}): {folded + inserted} activations smoothed over {count} batches "
                f"({folded} folded into their norm, {inserted} through an inserted Mul)")
        logger.info(note)
        return [note]

    @staticmethod
    def _fold_into_norm(value: ir.Value, readers: list[_Reader], scale: np.ndarray) -> bool:
        node = value.producer()
        if node is None or node.op_type != "LayerNormalization" or value.is_graph_output():
            return False
        if node.outputs[0] is not value or node.attributes.get_int("axis", -1) not in (-1, len(value.shape or []) - 1):
            return False
        if {id(u.node) for u in value.uses()} != {id(r.node) for r in readers}:
            return False  # another reader (a residual Add) needs the unsmoothed tensor
        params = [v for v in node.inputs[1:3] if v is not None]
        if any(p.const_value is None or len(p.uses()) != 1 or p.const_value.shape != (scale.size,) for p in params):
            return False
        for p in params:
            data = p.const_value.numpy().astype(np.float32) / scale  # type: ignore[union-attr]
            p.const_value = ir.tensor(data.astype(p.const_value.numpy().dtype), name=p.name)  # type: ignore[union-attr]
        return True

    @staticmethod
    def _insert_mul(model: ir.Model, value: ir.Value, readers: list[_Reader], scale: np.ndarray) -> None:
        dtype = np.float16 if value.dtype == ir.DataType.FLOAT16 else np.float32
        inv = ir.Value(name=f"{value.name}_smoothquant_inv", const_value=ir.tensor((1.0 / scale).astype(dtype)))
        model.graph.register_initializer(inv)
        mul = ir.node("Mul", [value, inv], name=f"{value.name}_smoothquant")
        mul.metadata_props[KEEP_FLOAT] = "smoothquant"
        out = mul.outputs[0]
        out.name, out.shape = f"{value.name}_smoothed", value.shape
        if value.dtype is not None:
            out.dtype = value.dtype
        producer = value.producer()
        if producer is None:
            model.graph.insert_before(readers[0].node, mul)
        else:
            model.graph.insert_after(producer, mul)
        for r in readers:
            r.node.replace_input_with(0, out)


def _scale_weight(model: ir.Model, reader: _Reader, scale: np.ndarray) -> None:
    """``W' = diag(s) W`` along the weight's input axis; a weight another node reads is copied first."""
    w = reader.weight
    data = w.const_value.numpy()  # type: ignore[union-attr]
    factor = scale[:, None] if reader.rows else scale[None, :]
    new = (data.astype(np.float32) * factor).astype(data.dtype)
    if len(w.uses()) > 1:
        copy = ir.Value(name=f"{w.name}_smoothed_{reader.node.name}", const_value=ir.tensor(new))
        copy.shape = w.shape
        if w.dtype is not None:
            copy.dtype = w.dtype
        model.graph.register_initializer(copy)
        reader.node.replace_input_with(1, copy)
    else:
        w.const_value = ir.tensor(new, name=w.name)
