"""Nodes without a torch implementation run in onnxruntime (forward only) inside the QAT mirror."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from qdq.errors import ModelError
from qdq.qat.torch_ops import OpFn

__all__ = ["ort_fallback"]


def ort_fallback(node: ir.Node, model: ir.Model) -> OpFn:
    """Run one node in onnxruntime (forward only): for float nodes without a torch implementation."""
    from qdq.session import make_session

    proto = ir.serde.serialize_node(node)
    n_in = len(node.inputs)
    del proto.input[:]
    proto.input.extend([f"in{i}" if node.inputs[i] is not None else "" for i in range(n_in)])
    del proto.output[:]
    proto.output.extend([f"out{i}" for i in range(len(node.outputs))])
    out_types = []
    for out in node.outputs:
        if out.dtype is None:
            raise ModelError(f"node '{node.name}' ({node.op_type}): output type unknown, cannot run it in onnxruntime")
        out_types.append(int(out.dtype))
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    sessions: dict[tuple[Any, ...], Any] = {}

    def run(ins: Any, state: Any) -> tuple[torch.Tensor, ...]:
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ins):
            raise ModelError(
                f"node '{node.name}' ({node.op_type}) runs in onnxruntime (no torch implementation), so gradients "
                f"cannot flow through it; register one with @qdq.qat.register_op('{node.op_type}')"
            )
        arrays = [None if t is None else t.detach().cpu().numpy() for t in ins]
        sig = tuple(None if a is None else (a.dtype.str, a.ndim) for a in arrays)
        if sig not in sessions:
            inputs = [onnx.helper.make_tensor_value_info(f"in{i}", onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                                         [None] * a.ndim)
                      for i, a in enumerate(arrays) if a is not None]
            outputs = [onnx.helper.make_tensor_value_info(f"out{i}", t, None) for i, t in enumerate(out_types)]
            g = onnx.helper.make_graph([proto], "fallback", inputs, outputs)
            m = onnx.helper.make_model(g, opset_imports=opsets, ir_version=model.ir_version)
            sessions[sig] = make_session(m, label=f"fallback model of node '{node.name}' ({node.op_type})")
        feeds = {f"in{i}": a for i, a in enumerate(arrays) if a is not None}
        device = next((t.device for t in ins if isinstance(t, torch.Tensor)), torch.device("cpu"))
        return tuple(torch.from_numpy(np.array(o, copy=True)).to(device) for o in sessions[sig].run(None, feeds))

    return run
