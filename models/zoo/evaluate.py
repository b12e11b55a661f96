"""Run a zoo ONNX file in onnxruntime (in chunks of its static batch, if any) and score outputs by SQNR."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["run_onnx", "sqnr_db"]

logger = logging.getLogger(__name__)


def run_onnx(path: Path | str, data: dict[str, np.ndarray], batch: int = 16) -> dict[str, np.ndarray]:
    """Outputs of ``path`` on ``data`` ({input name: [n, ...]}), concatenated over samples, keyed by output name.

    A model whose input declares a fixed batch dim runs in chunks of that size.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0].shape
    if first and isinstance(first[0], int) and first[0] > 0:
        batch = first[0]
    names = [o.name for o in session.get_outputs()]
    n = len(next(iter(data.values())))
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, n, batch):
        feeds = {i.name: data[i.name][start:start + batch] for i in session.get_inputs()}
        for k, v in zip(names, session.run(names, feeds), strict=True):
            chunks[k].append(v)
    return {k: np.concatenate(v) for k, v in chunks.items()}


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10·log10(Σref² / Σ(ref − test)²) in float64; inf when equal."""
    ref, out = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    return math.inf if noise == 0 else 10.0 * math.log10(max(signal, 1e-300) / noise)
