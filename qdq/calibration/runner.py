"""Run a float model in onnxruntime and stream chosen intermediate tensors to calculators.

One session of the float model with every observed tensor added as a graph output; each
batch's tensors go straight to their calculators and are dropped before the next batch,
so memory is bounded by one batch, not by the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qdq.calibration.base import QParamsCalculatorBase
from qdq.errors import DataError, ModelError, first_line
from qdq.model_io import to_proto

__all__ = ["CalibrationRunner", "make_session", "as_feeds"]

logger = logging.getLogger(__name__)


def make_session(model: ir.Model, *, level: str = "all", threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session of ``model`` (``level``: all / basic / none)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc


def as_feeds(batch: Any, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Normalise a batch (array, tuple/list in input order, or dict by name) to ORT feeds."""
    if isinstance(batch, Mapping):
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise DataError(f"batch is missing model inputs {missing}; it has {sorted(batch)}")
        items = [(n, batch[n]) for n in input_names]
    else:
        if not isinstance(batch, (tuple, list)):
            batch = (batch,)
        if len(batch) != len(input_names):
            raise DataError(f"model takes {len(input_names)} inputs ({', '.join(input_names)}), got {len(batch)}")
        items = list(zip(input_names, batch))
    feeds = {}
    for name, x in items:
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if x.dtype.kind == "f" and x.dtype != np.float32:
            x = x.astype(np.float32)
        feeds[name] = np.ascontiguousarray(x)
    return feeds


#: Bytes of observed tensors one onnxruntime run may produce; larger batches run in micro-batches.
DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024


class CalibrationRunner:
    """Float-model session whose extra outputs feed ``calculators`` (tensor name -> calculators).

    onnxruntime holds every requested output of a run at once, so memory would scale with the
    batch size times all observed activations. When every calculator accepts a batch in pieces,
    a batch runs as micro-batches sized to ``chunk_bytes`` (measured on the first run) and each
    calculator closes the batch once: same statistics, bounded memory.
    """

    def __init__(self, model: ir.Model, calculators: Mapping[str, Sequence[QParamsCalculatorBase]],
                 *, outputs: bool = False, threads: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.calculators = {k: list(v) for k, v in calculators.items() if v}
        clone = model.clone()
        graph = clone.graph
        self.output_names = [v.name or "" for v in graph.outputs] if outputs else []
        present = {v.name for v in graph.outputs}
        values: dict[str, ir.Value] = {v.name or "": v for v in graph.inputs}
        for node in graph:
            for out in node.outputs:
                values[out.name or ""] = out
        for name in self.calculators:
            if name in present or name in {v.name for v in graph.inputs}:
                continue
            value = values.get(name)
            if value is None:
                raise ModelError(f"observed tensor '{name}' is not produced by any node")
            graph.outputs.append(value)
        self.input_names = [v.name or "" for v in graph.inputs]
        self.session = make_session(clone, threads=threads)
        observed = [n for n in self.calculators if n not in self.input_names and n not in self.output_names]
        self.fetch = self.output_names + observed
        self.num_batches = 0
        self.chunk_bytes = chunk_bytes
        self.chunkable = all(c.supports_chunks for cs in self.calculators.values() for c in cs)
        self.bytes_per_sample: float | None = None

    def observe(self, batch: Any) -> list[np.ndarray]:
        """Run one batch, update every calculator; returns the model outputs (if ``outputs``)."""
        feeds = as_feeds(batch, self.input_names)
        for name, x in feeds.items():
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise DataError(f"NaN/Inf in calibration input '{name}' (batch {self.num_batches}); clean the data")
        n = _batch_len(feeds)
        if not self.chunkable or n is None or n <= 1:
            results = self._run(feeds, whole=True)
        else:
            step = 1 if self.bytes_per_sample is None else max(1, int(self.chunk_bytes // self.bytes_per_sample))
            parts = []
            for start in range(0, n, step):
                parts.append(self._run({k: v[start:start + step] for k, v in feeds.items()}, whole=False))
                if self.bytes_per_sample is None:  # measured on the first (1-sample) run
                    step = max(1, int(self.chunk_bytes // max(self.bytes_per_sample or 1.0, 1.0)))
            for calcs in self.calculators.values():
                for calc in calcs:
                    calc.end_batch()
            results = [np.concatenate(p) for p in zip(*parts)] if self.output_names else []
        self.num_batches += 1
        return results

    def _run(self, feeds: dict[str, np.ndarray], *, whole: bool) -> list[np.ndarray]:
        outs = self.session.run(self.fetch, feeds) if self.fetch else []
        if self.bytes_per_sample is None and outs:
            n = _batch_len(feeds) or 1
            self.bytes_per_sample = sum(o.nbytes for o in outs) / n
        tensors = dict(zip(self.fetch, outs))
        del outs
        results = [tensors[n] for n in self.output_names]
        for name in self.calculators:
            x = tensors.pop(name) if name in tensors else feeds[name]
            for calc in self.calculators[name]:
                try:
                    calc.observe(x) if whole else calc.observe_chunk(x)
                except DataError as exc:
                    raise DataError(f"tensor '{name}': {exc}") from exc
            del x
        return results


def _batch_len(feeds: dict[str, np.ndarray]) -> int | None:
    """The common first dimension of all inputs (None when inputs disagree or are scalars)."""
    sizes = {v.shape[0] if v.ndim else None for v in feeds.values()}
    return sizes.pop() if len(sizes) == 1 else None
