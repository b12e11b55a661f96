"""Core ML's torch ops for each Q->DQ site: the ops coremltools' torch.export frontend reads.

* weights int8/uint8 (per tensor / per channel) and int4/uint4 per channel ->
  ``quantized_decomposed.dequantize_per_tensor`` / ``dequantize_per_channel`` on integer buffers, which
  coremltools turns into ``constexpr_affine_dequantize`` (iOS17) / ``constexpr_blockwise_shift_scale`` (iOS18);
* int4/uint4 per block -> ``torchao.dequantize_affine`` on a 2-D view (block axis last, other axes
  flattened; coremltools reads rank-2 only), reshaped/permuted back; :mod:`qdq.backends.coreml.mil_passes`
  folds the view into one rank-N INT4 constexpr;
* activations (per tensor) -> ``quantize_per_tensor`` + ``dequantize_per_tensor`` (MIL ``quantize`` /
  ``dequantize``).

uint4 codes are stored shifted by -8 as int4 (``(q - 8) - (z - 8) == q - z``): the torchao frontend
reads signed 4-bit only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed

from qdq.backends.chatter import quiet
from qdq.backends.lowering import BackendOps, SiteInfo
from qdq.dtypes import QDType
from qdq.errors import BackendError

__all__ = ["OPS", "CoreMLOps", "block_view"]

logger = logging.getLogger(__name__)

_TORCH_STORAGE = {
    QDType.INT8: torch.int8, QDType.UINT8: torch.uint8, QDType.INT4: torch.int8, QDType.UINT4: torch.uint8,
}
_INT4 = (QDType.INT4, QDType.UINT4)


def _torchao_dequantize_affine() -> Any:
    try:
        with quiet("torchao", "torch.utils._pytree"):  # CUDA kernels it cannot load here
            import torchao  # noqa: F401  (registers torch.ops.torchao.dequantize_affine)
    except ImportError as exc:
        raise BackendError(
            "int4 per-block weights for coreml need torchao: pip install 'qdq[coreml]'") from exc
    return torch.ops.torchao.dequantize_affine


def block_view(shape: tuple[int, ...], axis: int) -> tuple[list[int], tuple[int, ...]]:
    """The permutation putting ``axis`` last and the permuted shape (flattened to 2-D around the block op)."""
    perm = [d for d in range(len(shape)) if d != axis] + [axis]
    return perm, tuple(shape[d] for d in perm)


def _check_site(site: SiteInfo) -> None:
    if site.dtype not in _TORCH_STORAGE:
        raise BackendError(f"coreml cannot store {site.dtype} tensor '{site.tensor}'; run legalize() first "
                           "(Core ML takes int8/uint8/int4/uint4 weights)")


class _PerTensorWeight(torch.nn.Module):
    """A weight stored as integer codes with one scale: ``dequantize_per_tensor``."""

    def __init__(self, codes: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.scale, self.zero_point, self.qmin, self.qmax, self.dtype = scale, zero_point, qmin, qmax, dtype

    def forward(self) -> torch.Tensor:
        return torch.ops.quantized_decomposed.dequantize_per_tensor(
            self.codes, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


class _PerChannelWeight(torch.nn.Module):
    """A weight stored as integer codes with one scale per channel: ``dequantize_per_channel``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                 qmin: int, qmax: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.axis, self.qmin, self.qmax, self.dtype = axis, qmin, qmax, dtype

    def forward(self) -> torch.Tensor:
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.codes, self.scales, self.zero_points, self.axis, self.qmin, self.qmax, self.dtype)


class _PerBlockWeight(torch.nn.Module):
    """An int4 weight blocked along one axis: ``torchao.dequantize_affine`` on its 2-D view, then the view undone."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 block_size: int, perm: list[int], permuted_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("codes", codes)  # (rows, cols): block axis last
        self.register_buffer("scales", scales)  # (rows, cols // block)
        self.register_buffer("zero_points", zero_points)
        self.block_size = block_size
        self.perm = perm
        self.permuted_shape = permuted_shape
        self.inverse = [perm.index(d) for d in range(len(perm))]
        self._dequantize_affine = _torchao_dequantize_affine()

    def forward(self) -> torch.Tensor:
        w = self._dequantize_affine(self.codes, [1, self.block_size], self.scales, self.zero_points,
                                    torch.int8, -8, 7)
        if len(self.permuted_shape) != 2:
            w = w.reshape(self.permuted_shape)
        if self.perm != sorted(self.perm):
            w = w.permute(self.inverse)
        return w


class _Activation(torch.nn.Module):
    """``DequantizeLinear(QuantizeLinear(x))`` per tensor as ``quantize_per_tensor`` + ``dequantize_per_tensor``."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax, self.dtype = scale, zero_point, qmin, qmax, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.ops.quantized_decomposed.quantize_per_tensor(
            x, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        return torch.ops.quantized_decomposed.dequantize_per_tensor(
            q, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


class CoreMLOps(BackendOps):
    """Integer weight buffers through ``quantized_decomposed`` / ``torchao`` ops; activations per tensor."""

    name = "coreml"

    def weight_module(self, site: SiteInfo, codes: np.ndarray) -> torch.nn.Module:
        _check_site(site)
        codes = np.asarray(codes).astype(np.int64)
        scale = np.asarray(site.scale, dtype=np.float32)
        zp = np.asarray(site.zero_point).astype(np.int64)
        qmin, qmax = int(site.dtype.qmin), int(site.dtype.qmax)
        storage = _TORCH_STORAGE[site.dtype]
        layout = site.layout
        if layout.block_size is not None:
            if site.dtype not in _INT4:
                raise BackendError(f"coreml takes per-block weights at 4 bits only; '{site.tensor}' is {site.dtype} "
                                   "(use per_channel for 8-bit weights)")
            return self._block(site, codes, scale, zp)
        if layout.axis is None:
            return _PerTensorWeight(torch.from_numpy(codes).to(storage), float(scale.reshape(-1)[0]),
                                    int(zp.reshape(-1)[0]), qmin, qmax, storage)
        return _PerChannelWeight(torch.from_numpy(codes).to(storage), torch.from_numpy(scale.reshape(-1)),
                                 torch.from_numpy(zp.reshape(-1)), layout.axis, qmin, qmax, storage)

    def _block(self, site: SiteInfo, codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> torch.nn.Module:
        axis, block = site.layout.axis, site.layout.block_size
        assert axis is not None and block is not None
        block = min(block, codes.shape[axis])  # one partial block: the whole axis
        if codes.shape[axis] % block:
            raise BackendError(f"'{site.tensor}': axis {axis} of {codes.shape} is not a multiple of block size {block}; "
                               "run qdq.backends.coreml.legalize() first (it keeps such weights at 8 bits)")
        if site.dtype == QDType.UINT4:
            codes, zp = codes - 8, zp - 8
        perm, permuted = block_view(codes.shape, axis)
        rows = int(np.prod(permuted[:-1], dtype=np.int64))
        c2 = np.ascontiguousarray(codes.transpose(perm)).reshape(rows, permuted[-1])
        s2 = np.ascontiguousarray(np.broadcast_to(scale, _blocked(codes.shape, axis, block)).transpose(perm))
        s2 = s2.reshape(rows, -1)
        z2 = None
        if np.any(zp):
            z2t = np.ascontiguousarray(np.broadcast_to(zp, _blocked(codes.shape, axis, block)).transpose(perm))
            z2 = torch.from_numpy(z2t.reshape(rows, -1).astype(np.int8))
        return _PerBlockWeight(torch.from_numpy(c2.astype(np.int8)), torch.from_numpy(s2.copy()), z2, block, perm, permuted)

    def activation_module(self, site: SiteInfo) -> torch.nn.Module:
        _check_site(site)
        if site.dtype in _INT4:
            raise BackendError(f"coreml has no 4-bit activations ('{site.tensor}' is {site.dtype}); use int8/uint8")
        scale = np.asarray(site.scale, dtype=np.float32)
        if scale.size != 1:
            raise BackendError(f"coreml quantizes activations per tensor only; '{site.tensor}' has {scale.size} scales "
                               "(use per_tensor granularity for activations)")
        zp = int(np.asarray(site.zero_point).reshape(-1)[0])
        return _Activation(float(scale.reshape(-1)[0]), zp, int(site.dtype.qmin), int(site.dtype.qmax),
                           _TORCH_STORAGE[site.dtype])


def _blocked(shape: tuple[int, ...], axis: int, block: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] = shape[axis] // block
    return tuple(out)


OPS: BackendOps = CoreMLOps()
