"""Speed ratios measured in one run: onnxruntime sessions timed round-robin, medians, spinning off.

Sessions are timed in the same loop (FP32, model 1, model 2, ..., repeated) so a slow spell of the
machine hits all of them alike. Each session's intra-op threads must not spin while the others run:
onnxruntime's default worker threads busy-wait after a run, and with several sessions alive on a
2-core machine the idle ones steal the cores of the one being timed (measured on MiniLM, batch 16:
qdq int8 1.52x and dynamic 1.57x with spinning, 1.79x and 1.95x without; each alone: 1.79x).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["session", "speedups"]

THREADS = 2  # the machine's cores (scripts/_bench/rows.py uses the same)


def session(path: Path | str, threads: int = THREADS) -> Any:
    """A CPU onnxruntime session with ``threads`` intra-op threads that do not spin between runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def speedups(fp32: Path | str, others: Sequence[Path | str], feeds: Mapping[str, np.ndarray] | np.ndarray,
             repeats: int, *, runs_per_sample: int = 1) -> list[float]:
    """median(FP32 time) / median(model time) for each of ``others`` on ``feeds`` (a feed dict, or one array
    for a single-input model); ``runs_per_sample`` inferences per timed sample (small batches)."""
    sessions = [session(p) for p in [fp32, *others]]
    feed_of = [dict(feeds) if isinstance(feeds, Mapping) else {s.get_inputs()[0].name: feeds} for s in sessions]
    for s, f in zip(sessions, feed_of, strict=True):  # warm up
        for _ in range(2):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (s, f) in enumerate(zip(sessions, feed_of, strict=True)):
            start = time.perf_counter()
            for _ in range(runs_per_sample):
                s.run(None, f)
            times[i].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    return [base / statistics.median(t) for t in times[1:]]
