"""Core AI's ops for each Q->DQ site: ``coreai::constexpr_blockwise_shift_scale`` weights, ``coreai::quantize``
/ ``coreai::dequantize`` activations (registered by ``coreai_torch._compression.custom_layers``).

The quantized dtype is always passed (``input_dtype`` / ``output_dtype``), so the converter never
guesses a bit width from the values (int4 codes are stored in int8 tensors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from qdq.backends.coreai._extra import require
from qdq.backends.lowering import BackendOps, SiteInfo
from qdq.dtypes import QDType
from qdq.errors import BackendError

__all__ = ["OPS", "CoreAIOps", "torch_dtypes"]

# QDType -> (logical torch dtype pinned in the op, torch dtype that stores the codes)
_DTYPES: dict[QDType, tuple[torch.dtype, torch.dtype]] = {
    QDType.INT8: (torch.int8, torch.int8),
    QDType.UINT8: (torch.uint8, torch.uint8),
    QDType.INT4: (torch.int4, torch.int8),  # type: ignore[attr-defined]
    QDType.UINT4: (torch.uint4, torch.uint8),  # type: ignore[attr-defined]
    QDType.FLOAT8_E4M3FN: (torch.float8_e4m3fn, torch.float8_e4m3fn),
    QDType.FLOAT8_E5M2: (torch.float8_e5m2, torch.float8_e5m2),
}


def torch_dtypes(dtype: QDType) -> tuple[torch.dtype, torch.dtype]:
    """(pinned logical dtype, storage dtype) of a qdq dtype Core AI takes; BackendError otherwise."""
    if dtype not in _DTYPES:
        raise BackendError(f"Core AI cannot store {dtype.value} tensors (it takes int8, uint8, int4, uint4, "
                           "float8_e4m3fn, float8_e5m2)")
    return _DTYPES[dtype]


def _ops() -> Any:
    require("coreai_torch._compression.custom_layers")
    return torch.ops.coreai


def _rank_shaped(param: np.ndarray, site: SiteInfo, rank: int) -> np.ndarray:
    """A scale/zero point of ONNX shape reshaped to the weight's rank (what constexpr_blockwise_shift_scale takes)."""
    if site.layout.axis is None:
        return np.asarray(param).reshape([1] * rank)
    if site.layout.block_size is not None:
        return np.asarray(param)  # ONNX blocked qparams already have the weight's rank
    view = [1] * rank
    view[site.layout.axis] = -1
    return np.asarray(param).reshape(view)


class WeightConstexpr(nn.Module):
    """Integer (or float8) weight codes dequantized by ``coreai::constexpr_blockwise_shift_scale``."""

    def __init__(self, site: SiteInfo, codes: np.ndarray) -> None:
        super().__init__()
        logical, storage = torch_dtypes(site.dtype)
        rank = codes.ndim
        # float8 codes carry their dtype; integer codes are stored in int8/uint8, so pin the bit width
        self.input_dtype = None if site.dtype.is_float else logical
        self.register_buffer("data", torch.from_numpy(np.asarray(codes, np.float32 if site.dtype.is_float
                                                                 else np.int32)).to(storage))
        self.register_buffer("scale", torch.from_numpy(_rank_shaped(site.scale, site, rank).astype(np.float32)))
        zp = _rank_shaped(site.zero_point, site, rank)
        if site.dtype.is_float or not np.any(zp):
            self.zero_point: torch.Tensor | None = None
        else:
            self.register_buffer("zero_point", torch.from_numpy(zp.astype(np.int32)).to(storage))

    def forward(self) -> torch.Tensor:
        return _ops().constexpr_blockwise_shift_scale(self.data, self.scale, zero_point=self.zero_point,
                                                      input_dtype=self.input_dtype, output_dtype=torch.float32)


class ActivationQDQ(nn.Module):
    """``coreai::quantize`` then ``coreai::dequantize`` (per-tensor, or per-channel along ``axis``)."""

    def __init__(self, site: SiteInfo) -> None:
        super().__init__()
        logical, storage = torch_dtypes(site.dtype)
        if logical != storage:
            raise BackendError(f"Core AI lowering: activation '{site.tensor}' is {site.dtype.value}; torch cannot "
                               "hold sub-byte activations, use 8-bit or float8 activations")
        if site.layout.block_size is not None:
            raise BackendError(f"Core AI lowering: activation '{site.tensor}' is quantized per block; "
                               "Core AI takes per-tensor or per-channel activations")
        self.dtype = logical
        self.axis = 0 if site.layout.axis is None else site.layout.axis
        shape: tuple[int, ...] = () if site.layout.axis is None else (-1,)
        self.register_buffer("scale", torch.from_numpy(np.asarray(site.scale, np.float32).reshape(shape)))
        if site.dtype.is_float:
            self.zero_point: torch.Tensor | None = None
        else:
            zp = np.asarray(site.zero_point, np.int32).reshape(shape)
            self.register_buffer("zero_point", torch.from_numpy(zp).to(storage))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _ops()
        q = ops.quantize(x, self.scale, self.dtype, zero_point=self.zero_point, axis=self.axis)
        return ops.dequantize(q, self.scale, zero_point=self.zero_point, axis=self.axis, input_dtype=self.dtype,
                              output_dtype=torch.float32)


class CoreAIOps(BackendOps):
    """:class:`~qdq.backends.lowering.BackendOps` for coreai-torch's converter."""

    name = "coreai"

    def weight_module(self, site: SiteInfo, codes: np.ndarray) -> nn.Module:
        return WeightConstexpr(site, codes)

    def activation_module(self, site: SiteInfo) -> nn.Module:
        return ActivationQDQ(site)

    def decompositions(self) -> Any:
        return require("coreai_torch").get_decomp_table()


OPS = CoreAIOps()
