"""Cross-layer equalization (Nagel et al. 2019): even out the per-channel ranges of consecutive convolutions.

For ``Conv1 -> [ReLU] -> Conv2`` (Conv1's output channel ``c`` read only as Conv2's input channel ``c``), scaling
Conv1's output channel by ``1/s_c`` (weights and bias) and Conv2's input channel by ``s_c`` leaves the network
unchanged, because ReLU is positively homogeneous. With ``r1_c`` = max|W1[c]| and ``r2_c`` = max|W2[:, c]|,
``s_c = sqrt(r1_c / r2_c)`` makes both ranges ``sqrt(r1_c * r2_c)``: per-tensor weight grids lose less, and the
intermediate activation's channels (what a per-tensor activation grid sees) move toward each other. Depthwise
convolutions (either side) are handled per channel. Pairs are equalized ``iterations`` times along chains.

ReLU6 / Clip(0, 6) is not homogeneous: ``relu6=True`` replaces it by ReLU between equalized pairs (AIMET's
approach; it changes the model for activations above 6), otherwise such pairs are left alone. A data-free
algorithm: the calibration batches are not read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from qdq.algorithms import Algorithm, AlgorithmContext, register_algorithm
from qdq.errors import ConfigError
from qdq.graph.readers import sole_reader

__all__ = ["CrossLayerEqualization"]

logger = logging.getLogger(__name__)


def _conv(node: ir.Node | None) -> bool:
    if node is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT or len(w.uses()) != 1:
        return False
    b = node.inputs[2] if len(node.inputs) > 2 else None
    return b is None or (b.const_value is not None and len(b.uses()) == 1)


def _relu6(node: ir.Node) -> bool:
    if node.op_type != "Clip" or len(node.inputs) < 3:
        return False
    lo, hi = node.inputs[1], node.inputs[2]
    if lo is None or hi is None or lo.const_value is None or hi.const_value is None:
        return False
    return float(lo.const_value.numpy()) == 0.0 and float(hi.const_value.numpy()) > 0.0


def _pairs(model: ir.Model, relu6: bool) -> list[tuple[ir.Node, ir.Node | None, ir.Node]]:
    """(Conv1, activation or None, Conv2) with Conv1's output reaching only Conv2's input 0."""
    out = []
    for node in model.graph:
        if not _conv(node):
            continue
        nxt = sole_reader(node.outputs[0])
        act = None
        if nxt is not None and (nxt.op_type == "Relu" or (relu6 and _relu6(nxt))):
            act = nxt
            nxt = sole_reader(nxt.outputs[0])
        if nxt is None or not _conv(nxt) or nxt.inputs[0] is not (act or node).outputs[0]:
            continue
        out.append((node, act, nxt))
    return out


def _equalize(c1: ir.Node, c2: ir.Node) -> bool:
    w1v, w2v = c1.inputs[1], c2.inputs[1]
    assert w1v is not None and w2v is not None
    w1 = w1v.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
    w2 = w2v.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
    channels = w1.shape[0]
    g2: int = c2.attributes.get_int("group", 1)
    if w2.shape[1] * g2 != channels:
        return False
    per_in = w2.shape[1]  # Conv2 input channels per group
    # r2_c: max |W2[o, c_local]| over the outputs o of c's group
    w2g = np.abs(w2).reshape(g2, w2.shape[0] // g2, per_in, -1)
    r2 = w2g.max(axis=(1, 3)).reshape(-1)  # [groups * per_in] = [channels]
    r1 = np.abs(w1).reshape(channels, -1).max(axis=1)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones(channels)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    s = np.clip(s, 1e-4, 1e4)
    w1 = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
    scale_in = s.reshape(g2, 1, per_in, *([1] * (w2.ndim - 2)))
    w2 = (w2.reshape(g2, w2.shape[0] // g2, per_in, *w2.shape[2:]) * scale_in).reshape(w2.shape)
    w1v.const_value = ir.tensor(w1.astype(np.float32), name=w1v.name)
    w2v.const_value = ir.tensor(w2.astype(np.float32), name=w2v.name)
    b1 = c1.inputs[2] if len(c1.inputs) > 2 else None
    if b1 is not None and b1.const_value is not None:
        b = b1.const_value.numpy().astype(np.float64) / s
        b1.const_value = ir.tensor(b.astype(np.float32), name=b1.name)
    return True


@register_algorithm("cle")
class CrossLayerEqualization(Algorithm):
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {"iterations": (int, 2), "relu6": (bool, False)}

    def validate(self) -> None:
        if self.options["iterations"] < 1:
            raise ConfigError(f"cle iterations must be >= 1, got {self.options['iterations']}")

    def applies_to(self, model: ir.Model) -> bool:
        return bool(_pairs(model, self.options["relu6"]))

    def apply(self, model: ir.Model, batches: Callable[[], Iterable[Mapping[str, Any]]],
              context: AlgorithmContext | None = None) -> list[str]:
        pairs = _pairs(model, self.options["relu6"])
        replaced = 0
        if self.options["relu6"]:
            for _, act, _ in pairs:
                if act is not None and act.op_type == "Clip":
                    relu = ir.node("Relu", [act.inputs[0]], name=f"{act.name}_relu")
                    model.graph.insert_before(act, relu)
                    relu.outputs[0].shape = act.outputs[0].shape
                    if act.outputs[0].dtype is not None:
                        relu.outputs[0].dtype = act.outputs[0].dtype
                    act.outputs[0].replace_all_uses_with(relu.outputs[0])
                    name = act.outputs[0].name
                    model.graph.remove(act, safe=True)
                    relu.outputs[0].name = name
                    replaced += 1
            pairs = _pairs(model, False)
        done = 0
        for _ in range(self.options["iterations"]):
            done = sum(_equalize(c1, c2) for c1, _, c2 in pairs)
        note = (f"cle: {done} conv pairs equalized ({self.options['iterations']} iterations)"
                + (f", {replaced} ReLU6 replaced by ReLU" if replaced else ""))
        logger.info(note)
        return [note]
