"""Shared pieces of the zoo: seeded construction, BatchNorm statistics from data, image-like data, export.

Weights are torch's default init (fixed seed); BatchNorm layers get a random affine and running
statistics measured on the model's own synthetic data (train-mode forward passes, cumulative
average), so every Conv->BN->activation sees the unit-scale, per-channel-shifted ranges a trained
network has instead of the identity statistics of a fresh BatchNorm.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "calibrate_batchnorm",
    "export_default",
    "export_dynamo",
    "image_data",
    "seeded",
    "to_torch",
]

logger = logging.getLogger(__name__)


def image_data(n: int, seed: int, shape: Sequence[int], dtype: type = np.float32) -> np.ndarray:
    """``n`` image-like samples of ``shape`` (C, H, W): smooth structure (upsampled coarse noise) plus detail."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    coarse = rng.standard_normal((n, c, max(1, h // 4), max(1, w // 4))).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :h, :w]
    detail = 0.35 * rng.standard_normal((n, c, h, w)).astype(np.float32)
    return (smooth + detail).astype(dtype)


def to_torch(data: dict[str, np.ndarray], names: Sequence[str], start: int = 0, stop: int | None = None) -> tuple:
    """The arrays of ``data`` for ``names`` as torch tensors (a sample range), in order."""
    return tuple(torch.from_numpy(np.ascontiguousarray(data[k][start:stop])) for k in names)


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, batches: Sequence[tuple], seed: int = 0) -> nn.Module:
    """Random BN affine (gamma in [0.5, 1.5], beta ~ N(0, 0.25)) and running stats measured on ``batches``."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=gen))
        bn.bias.copy_(0.25 * torch.randn(bn.bias.shape, generator=gen))
    module.train()
    for args in batches:
        module(*args)
    return module.eval()


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` built under a fixed torch seed (same weights on every machine and run)."""
    torch.manual_seed(seed)
    return factory()


def export_default(module: nn.Module, args: tuple, path: Path, *, dynamic_batch: bool = True,
                   input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> Path:
    """Export through :func:`qdq.export` (dynamo exporter, BatchNorm folded, atomic write)."""
    from qdq.torch_export import export

    return export(module, args, path, dynamic_batch=dynamic_batch, input_names=input_names,
                  output_names=output_names)


def export_dynamo(module: nn.Module, args: tuple, path: Path, *, dynamic_shapes: Any,
                  input_names: Sequence[str], output_names: Sequence[str]) -> Path:
    """torch.onnx dynamo export with arbitrary ``dynamic_shapes`` (e.g. batch and sequence), saved atomically."""
    from qdq.model_io import save

    module.eval()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=list(input_names), output_names=list(output_names),
                                    optimize=True, verbose=False, report=False)
    save(program.model, path)
    return path
