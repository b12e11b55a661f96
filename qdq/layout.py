"""Where a tensor's quantization parameters live: per tensor, per channel or per block.

A :class:`QLayout` is a granularity resolved against a concrete tensor rank: axes are
non-negative and the block size is known. It decides the shape of scale/zero-point
(ONNX QuantizeLinear conventions) and how statistics are reduced.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qdq.errors import ConfigError
from qdq.spec import Granularity, PerBlockGranularity, PerChannelGranularity

__all__ = ["QLayout", "reduce_minmax", "resolve_layout"]


@dataclasses.dataclass(frozen=True)
class QLayout:
    """``axis`` is None for per-tensor; ``block_size`` is None unless blocked."""

    axis: int | None = None
    block_size: int | None = None

    @property
    def per_tensor(self) -> bool:
        return self.axis is None

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of scale/zero-point for a tensor of ``shape`` (ONNX convention)."""
        if self.axis is None:
            return ()
        if self.block_size is None:
            return (shape[self.axis],)
        out = list(shape)
        out[self.axis] = -(-shape[self.axis] // self.block_size)
        return tuple(out)

    def expand(self, param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Broadcast a scale/zero-point to the full tensor shape."""
        param = np.asarray(param)
        if self.axis is None:
            return param
        if self.block_size is None:
            view = [1] * len(shape)
            view[self.axis] = shape[self.axis]
            return param.reshape(view)
        rep = np.repeat(param, self.block_size, axis=self.axis)
        return np.take(rep, np.arange(shape[self.axis]), axis=self.axis)


def resolve_layout(
    granularity: Granularity,
    rank: int,
    *,
    channel_axis: int | None = None,
    block_axis: int | None = None,
    what: str = "tensor",
) -> QLayout:
    """Resolve a granularity for a tensor of ``rank``; ``None`` axes take the op's defaults."""
    if isinstance(granularity, PerChannelGranularity):
        axis = granularity.axis if granularity.axis is not None else channel_axis
        if axis is None:
            raise ConfigError(
                f"per_channel granularity on {what} needs an explicit axis (e.g. {{type: per_channel, axis: 1}})"
            )
        return QLayout(axis=_normalize(axis, rank, what))
    if isinstance(granularity, PerBlockGranularity):
        axis = granularity.axis if granularity.axis is not None else block_axis
        if axis is None:
            raise ConfigError(
                f"per_block granularity on {what} needs an explicit axis (e.g. {{type: per_block, axis: 1, block_size: 32}})"
            )
        return QLayout(axis=_normalize(axis, rank, what), block_size=granularity.block_size)
    return QLayout()


def _normalize(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise ConfigError(f"axis {axis} is out of range for {what} of rank {rank}")
    return axis % rank


def reduce_minmax(x: np.ndarray, layout: QLayout) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``x`` per quantization unit, shaped like the scale."""
    if layout.axis is None:
        return np.asarray(x.min(), np.float32), np.asarray(x.max(), np.float32)
    if layout.block_size is None:
        moved = np.moveaxis(x, layout.axis, 0).reshape(x.shape[layout.axis], -1)
        return moved.min(axis=1).astype(np.float32), moved.max(axis=1).astype(np.float32)
    bs, ax = layout.block_size, layout.axis
    n = x.shape[ax]
    nblocks = -(-n // bs)
    if n % bs:
        # Pad a ragged last block with its own edge values so they do not widen the range.
        pad = [(0, 0)] * x.ndim
        pad[ax] = (0, nblocks * bs - n)
        x = np.pad(x, pad, mode="edge")
    shape = list(x.shape)
    shape[ax : ax + 1] = [nblocks, bs]
    xb = x.reshape(shape)
    return xb.min(axis=ax + 1).astype(np.float32), xb.max(axis=ax + 1).astype(np.float32)
