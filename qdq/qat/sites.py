"""Q->DQ pairs as the QAT mirror sees them: :class:`FakeQuantSite`, the pair's layout and spec, and
the int32 bias fake-quant that mirrors onnxruntime's finalize (:mod:`qdq.passes.quantize_bias`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from qdq.dtypes import QDType
from qdq.errors import ModelError
from qdq.layout import QLayout
from qdq.qat.torch_ops import OpFn
from qdq.spec import PerBlockGranularity, PerChannelGranularity, QScheme, QuantizationSpec

__all__ = ["QDQ_DOMAINS", "FakeQuantSite", "bias_quant_sites", "infer_spec", "is_qdq", "only_qparams", "pair_of",
           "q_layout", "site_of_dq_output", "with_bias_quant"]

QDQ_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class FakeQuantSite:
    """One Q->DQ pair of the graph as the mirror sees it.

    ``key`` is the target key; ``root`` the key whose qparams it uses (itself unless shared);
    ``codes`` / ``output`` are the names of the Q output (quantized codes) and DQ output.
    """

    key: str
    root: str
    tensor: str
    kind: str
    q_node: str
    dq_node: str
    codes: str
    output: str

    @property
    def shared(self) -> bool:
        return self.root != self.key


def is_qdq(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in QDQ_DOMAINS


def pair_of(q: ir.Node) -> ir.Node:
    """The DequantizeLinear that reads ``q``'s output with the same scale/zero point."""
    out = q.outputs[0]
    consumers = {id(u.node): u.node for u in out.uses()}
    dq = next(iter(consumers.values())) if len(consumers) == 1 else None
    zp_q = q.inputs[2] if len(q.inputs) > 2 else None
    ok = (dq is not None and is_qdq(dq, "DequantizeLinear") and not out.is_graph_output()
          and dq.inputs[1] is q.inputs[1] and (dq.inputs[2] if len(dq.inputs) > 2 else None) is zp_q)
    if not ok:
        raise ModelError(
            f"QuantizeLinear '{q.name}' is not followed by exactly one matching DequantizeLinear; the QAT mirror "
            "needs the prepared QDQ form (float weights -> Q -> DQ); build it with qdq's Quantizer, not finalize"
        )
    return dq  # type: ignore[return-value]


def infer_spec(zp: np.ndarray, dtype: QDType, scale: np.ndarray, axis: int | None, block: int | None) -> QuantizationSpec:
    """A spec for a Q node without ``qdq.spec`` metadata (zero point decides the scheme)."""
    nonzero = (not dtype.is_float) and np.any(zp.astype(np.int64) != (0 if dtype.is_signed else (dtype.qmax + 1) // 2))
    gran: Any = "per_tensor"
    if block is not None:
        gran = PerBlockGranularity(axis=axis, block_size=block)
    elif axis is not None:
        gran = PerChannelGranularity(axis=axis)
    return QuantizationSpec(dtype=dtype, qscheme=QScheme.ASYMMETRIC if nonzero else QScheme.SYMMETRIC,
                            granularity=gran)


def q_layout(q: ir.Node, scale: np.ndarray, rank: int | None) -> QLayout:
    block = q.attributes.get_int("block_size", 0) or None
    if "axis" not in q.attributes and block is None and scale.size == 1:
        return QLayout()
    axis = q.attributes.get_int("axis", 1)
    if axis < 0:
        if rank is None:
            raise ModelError(f"QuantizeLinear '{q.name}': negative axis on a tensor of unknown rank")
        axis += rank
    return QLayout(axis=axis, block_size=block)


def only_qparams(value: ir.Value) -> bool:
    """True for scale/zero-point initializers (read only by Q/DQ at inputs 1 and 2)."""
    uses = list(value.uses())
    return bool(uses) and all(
        (is_qdq(u.node, "QuantizeLinear") or is_qdq(u.node, "DequantizeLinear")) and u.idx in (1, 2) for u in uses
    )


def site_of_dq_output(value: ir.Value | None, sites: Mapping[str, FakeQuantSite]) -> FakeQuantSite | None:
    producer = value.producer() if value is not None else None
    if producer is None or not is_qdq(producer, "DequantizeLinear"):
        return None
    return next((s for s in sites.values() if s.dq_node == producer.name), None)


def bias_quant_sites(node: ir.Node, sites: Mapping[str, FakeQuantSite]) -> tuple[str, str] | None:
    """(input root, weight root) when onnxruntime's finalize quantizes this node's bias to int32.

    Eligibility is :func:`qdq.passes.quantize_bias.bias_qparams`'s (the finalize pass itself: 8-bit
    input and weight, per-tensor input, per-tensor or per-output-channel weight, constant 1-D float
    bias); the scale ``s_x * s_w`` is taken from the fake-quants at every forward, so it follows
    training.
    """
    from qdq.passes.quantize_bias import bias_qparams

    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = node.inputs[2]
    if (not bias.is_initializer() or bias.const_value is None or bias.dtype != ir.DataType.FLOAT
            or len(bias.const_value.shape) != 1 or bias_qparams(node) is None):
        return None
    xs, ws = site_of_dq_output(node.inputs[0], sites), site_of_dq_output(node.inputs[1], sites)
    if xs is None or ws is None:
        return None
    return xs.root, ws.root


class _BiasFakeQuant(torch.autograd.Function):
    """int32 bias fake quantization with a straight-through gradient for the bias."""

    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q = torch.round(bias / scale).clamp(-(2.0**31), 2.0**31 - 128)
        return q * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return grad, None


def with_bias_quant(run: OpFn, x_root: str, w_root: str) -> OpFn:
    def wrapped(ins: Any, state: Any) -> Any:
        fx, fw = state.fake_quant(x_root), state.fake_quant(w_root)
        if fx.fake_quant_enabled and fw.fake_quant_enabled and ins[2] is not None:
            scale = fx.scale.detach().reshape(()) * fw.scale.detach()
            ins = list(ins)
            ins[2] = _BiasFakeQuant.apply(ins[2].to(torch.float32), scale.reshape(-1) if scale.dim() else scale)
        return run(ins, state)

    return wrapped


