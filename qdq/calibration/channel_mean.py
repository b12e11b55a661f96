"""Streaming per-channel mean of a tensor (the statistic bias correction needs)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

__all__ = ["ChannelMean"]


class ChannelMean:
    """Running mean of ``x`` over every axis but ``axis`` (float64 sums; memory = one vector)."""

    supports_chunks: ClassVar[bool] = True

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count = 0

    def observe_chunk(self, x: np.ndarray) -> None:
        axis = self.axis % x.ndim
        sums = x.sum(axis=tuple(i for i in range(x.ndim) if i != axis), dtype=np.float64)
        self.total = sums if self.total is None else self.total + sums
        self.count += x.size // x.shape[axis]

    def observe(self, x: np.ndarray) -> None:
        self.observe_chunk(x)

    def end_batch(self) -> None:
        pass

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.total is None else (self.total / max(self.count, 1)).astype(np.float32)
