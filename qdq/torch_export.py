"""PyTorch -> ONNX export with the dynamo exporter: dynamic batch, BatchNorm folded, atomic write.

torch is imported inside :func:`export` so ``import qdq`` works without torch installed.
The exporter's onnxscript optimizer already folds constants and BatchNormalization into a
preceding Conv; :func:`fold_batchnorm_into_conv` is a safety net for anything it leaves behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qdq.errors import ModelError, first_line
from qdq.model_io import EXTERNAL_DATA_THRESHOLD, save

__all__ = ["EXTERNAL_DATA_THRESHOLD", "export", "fold_batchnorm_into_conv"]

logger = logging.getLogger(__name__)

BATCH_DIM_NAME = "batch"




def _widen_batch(args: tuple, torch: Any) -> tuple:
    """Repeat batch-1 tensor examples to batch 2: torch.export specialises size-1 dims, defeating a dynamic batch."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1:
            a = torch.cat([a, a], dim=0)
        out.append(a)
    return tuple(out)


def _dynamic_shapes(args: tuple, torch: Any) -> tuple:
    """Per-argument dynamic_shapes spec marking dim 0 of every tensor as the shared 'batch' Dim."""
    batch = torch.export.Dim(BATCH_DIM_NAME, min=1)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def fold_batchnorm_into_conv(model: ir.Model) -> int:
    """Fold inference BatchNormalization nodes that directly follow a Conv with constant weights.

    Returns the number of folded nodes. Only folds when the Conv output feeds nothing but the BN,
    so other consumers never see changed values.
    """
    graph = model.graph
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.outputs) != 1:
            continue
        conv_out = bn.inputs[0]
        if conv_out is None:
            continue
        conv = conv_out.producer()
        if conv is None or conv.op_type != "Conv" or len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            continue
        consts = [v.const_value if v is not None else None for v in bn.inputs[1:5]]
        w_val = conv.inputs[1]
        if any(c is None for c in consts) or w_val is None or w_val.const_value is None:
            continue
        b_val = conv.inputs[2] if len(conv.inputs) > 2 else None
        if b_val is not None and b_val.const_value is None:
            continue
        eps_attr = bn.attributes.get("epsilon")
        eps = eps_attr.as_float() if eps_attr is not None else 1e-5
        scale, bias, mean, var = (c.numpy().astype(np.float64) for c in consts if c is not None)
        w = w_val.const_value.numpy()
        b_const = b_val.const_value if b_val is not None else None
        b = b_const.numpy().astype(np.float64) if b_const is not None else np.zeros_like(mean)
        factor = scale / np.sqrt(var + eps)
        new_w = (w.astype(np.float64) * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        new_b = ((b - mean) * factor + bias).astype(w.dtype)
        w_init = ir.Value(name=f"{conv.name or 'conv'}_bnfold_weight", const_value=ir.tensor(new_w))
        b_init = ir.Value(name=f"{conv.name or 'conv'}_bnfold_bias", const_value=ir.tensor(new_b))
        w_init.shape, w_init.type = ir.Shape(new_w.shape), ir.TensorType(ir.DataType.from_numpy(new_w.dtype))
        b_init.shape, b_init.type = ir.Shape(new_b.shape), ir.TensorType(ir.DataType.from_numpy(new_b.dtype))
        graph.register_initializer(w_init)
        graph.register_initializer(b_init)
        conv.replace_input_with(1, w_init)
        if len(conv.inputs) > 2:
            conv.replace_input_with(2, b_init)
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, b_init)
        bn_out = bn.outputs[0]
        ir.convenience.replace_all_uses_with(bn_out, conv_out)
        if bn_out.is_graph_output():
            graph.outputs[graph.outputs.index(bn_out)] = conv_out
            conv_out.name = bn_out.name
        graph.remove(bn, safe=True)
        folded += 1
    if folded:
        _drop_unused_initializers(graph)
    return folded


def _drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove initializers no node or output references (left over after folding)."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


def _remove_initializer_inputs(graph: ir.Graph) -> None:
    """Drop graph inputs that are also initializers so runtimes treat them as constants."""
    inits = set(graph.initializers.values())
    for value in list(graph.inputs):
        if value in inits:
            graph.inputs.remove(value)


def export(
    model: Any,
    args: tuple,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Export a torch ``nn.Module`` to ONNX at ``path`` and return the path.

    The model is exported in eval mode (its training flag is restored afterwards; parameters are
    not touched). With ``dynamic_batch`` dim 0 of every tensor input is the symbolic ``batch``.
    Raises :class:`ModelError` with a one-line reason if export or saving fails.
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - environment dependent
        raise ModelError("exporting needs PyTorch: pip install 'qdq[torch]'") from exc

    path = Path(path)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"export expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    if not path.parent.is_dir():
        raise ModelError(f"cannot export to {path}: folder {path.parent} does not exist")

    was_training = model.training
    model.eval()
    try:
        export_args = _widen_batch(args, torch) if dynamic_batch else args
        kwargs: dict[str, Any] = {}
        if dynamic_batch:
            kwargs["dynamic_shapes"] = _dynamic_shapes(export_args, torch)
        if opset is not None:
            kwargs["opset_version"] = opset
        with torch.no_grad(), contextlib.redirect_stdout(_LogWriter()), _quiet_exporter():
            program = torch.onnx.export(
                model,
                export_args,
                dynamo=True,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                optimize=True,
                verbose=False,
                report=False,
                **kwargs,
            )
    except Exception as exc:
        raise ModelError(f"torch.onnx export of {type(model).__name__} failed: {first_line(exc, with_type=True)}") from exc
    finally:
        model.train(was_training)

    assert program is not None
    ir_model: ir.Model = program.model
    n_folded = fold_batchnorm_into_conv(ir_model)
    if n_folded:
        logger.info("folded %d BatchNormalization nodes left by the exporter", n_folded)
    remaining = sum(1 for n in ir_model.graph.all_nodes() if n.op_type == "BatchNormalization")
    if remaining:
        logger.warning("%d BatchNormalization nodes could not be folded into a preceding Conv", remaining)
    _remove_initializer_inputs(ir_model.graph)
    save(ir_model, path)
    logger.info("exported %s to %s (opset %s)", type(model).__name__, path, ir_model.opset_imports.get("", "?"))
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's noisy FutureWarnings and 'torchvision is not installed' registry warnings."""
    reg_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = reg_logger.level
    reg_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        reg_logger.setLevel(old_level)


class _LogWriter:
    """File-like sink that forwards the exporter's progress prints to the debug log instead of stdout."""

    def write(self, text: str) -> int:
        if text.strip():
            logger.debug("%s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass
