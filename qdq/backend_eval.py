"""Core ML / Core AI artifacts measured: what the converters stored, how big, and (Core AI) how accurate.

Used by ``qdq demo`` and ``scripts/apple_backends.py``. Each row quantizes with :func:`qdq.quantize` (the
same path as ``qdq quantize --backend coreml|coreai -o ...``), reads the saved artifact back with the
backend's ``inspect`` (MIL ops of the ``.mlpackage``; MLIR ops of the ``.aimodel``) and, for Core AI, runs
it with the Core AI runtime on Linux against onnxruntime on the same QDQ model finalized for
onnxruntime (agreement) and against FP32 (top-1, SQNR). Core ML packages cannot run off macOS: their
rows report storage only.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qdq.backends import ExportBackend
from qdq.backends.artifact import SUFFIXES, backend_module
from qdq.metrics import sqnr_db
from qdq.model_io import load_model
from qdq.oneshot import quantize
from qdq.session import make_session

__all__ = ["BackendRow", "backend_rows", "format_backend_table", "logits", "ort_runner"]

_WEIGHT_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "blockwise_shift_scale")


@dataclasses.dataclass
class BackendRow:
    backend: str
    preset: str
    options: dict[str, Any]
    weight_ops: int  # constexpr / blockwise_shift_scale ops in the artifact
    weight_dtypes: dict[str, int]  # stored dtype -> weights
    float_weights: int  # conv/linear/matmul weights still stored as float (0 = none left)
    activation_pairs: int  # quantize ops
    size_mb: float
    seconds: float  # quantize + convert + save
    notes: list[str]
    top1: float | None = None  # Core AI runtime, vs labels
    agreement: float | None = None  # Core AI runtime top-1 == onnxruntime (same QDQ model) top-1, %
    sqnr_db: float | None = None  # Core AI runtime logits vs FP32 logits
    #: the noise floor of that agreement: onnxruntime against itself on the same QDQ model (its int8
    #: kernels vs the QDQ graph with graph optimizations off): 1-step rounding differences from
    #: summation order cascade through deep int8 networks in any two runtimes
    ort_self_agreement: float | None = None

    @property
    def stored(self) -> str:
        return ", ".join(f"{n} {d}" for d, n in sorted(self.weight_dtypes.items())) or "—"


def logits(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """``run`` over ``x`` in batches, concatenated."""
    return np.concatenate([run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def ort_runner(model: Any, level: str = "all") -> Callable[[np.ndarray], np.ndarray]:
    """The first output of ``model`` in onnxruntime (graph optimization ``level``), as a function of its first input."""
    session = make_session(load_model(model), level=level)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def backend_rows(fp32_path: str | Path, calib: Callable[[], Iterable[np.ndarray]], eval_x: np.ndarray,
                 eval_y: np.ndarray, cases: Iterable[tuple[str, Any, dict[str, Any]]], out_dir: str | Path, *,
                 batch_size: int = 32) -> list[BackendRow]:
    """One row per ``(backend, config, options)`` case: quantize ``fp32_path`` (calibrating on ``calib()``),
    save to ``out_dir``, inspect, and for Core AI run the asset on ``eval_x``."""
    from qdq.quantizer import finalize_model

    out_dir = Path(out_dir)
    ref = logits(ort_runner(fp32_path), eval_x, batch_size)
    rows = []
    for i, (backend, config, options) in enumerate(cases):
        b = ExportBackend.parse(backend)
        path = out_dir / f"{b.value}-{i}{SUFFIXES[b]}"
        t0 = time.perf_counter()
        final = quantize(fp32_path, config, calib(), backend=b, output=path, progress=False, **options)
        seconds = time.perf_counter() - t0
        info = backend_module(b).inspect(path)
        ops = info["ops"]
        row = BackendRow(backend=b.value, preset=str(config), options=dict(options),
                         weight_ops=sum(ops.get(k, 0) for k in _WEIGHT_OPS), weight_dtypes=info["weight_dtypes"],
                         float_weights=len(info["float_weights"]), activation_pairs=ops.get("quantize", 0),
                         size_mb=info["size_bytes"] / 1e6, seconds=seconds, notes=[str(n) for n in final.notes])
        if b is ExportBackend.CoreAI:
            from qdq.backends.coreai import CoreAIRuntime

            ort_q = logits(ort_runner(finalize_model(final.onnx_model, ExportBackend.ONNXRuntime)), eval_x, batch_size)
            ort_plain = logits(ort_runner(final.onnx_model, level="none"), eval_x, batch_size)
            with CoreAIRuntime(path) as rt:
                got = logits(lambda x: rt.run(x)[0], eval_x, batch_size)
            row.top1 = float((got.argmax(-1) == eval_y).mean() * 100)
            row.agreement = float((got.argmax(-1) == ort_q.argmax(-1)).mean() * 100)
            row.sqnr_db = sqnr_db(ref, got)
            row.ort_self_agreement = float((ort_plain.argmax(-1) == ort_q.argmax(-1)).mean() * 100)
        rows.append(row)
    return rows


def format_backend_table(rows: list[BackendRow], title: str, fp32_top1: float | None = None) -> str:
    """Markdown table of ``rows``."""
    lines = [f"### {title}", ""]
    if fp32_top1 is not None:
        lines += [f"FP32 top-1 (onnxruntime): {fp32_top1:.2f} %", ""]
    lines += [("| backend | preset | options | weight ops | stored weights | float weights | Q/DQ pairs | size MB "
               "| top-1 % | agreement with onnxruntime % | onnxruntime vs itself % | SQNR vs FP32 dB |"),
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r.options.items()) or "—"
        lines.append(f"| {r.backend} | {r.preset} | {opts} | {r.weight_ops} | {r.stored} | {r.float_weights} | "
                     f"{r.activation_pairs} | {r.size_mb:.2f} | {num(r.top1, '.2f')} | {num(r.agreement, '.2f')} | "
                     f"{num(r.ort_self_agreement, '.2f')} | {num(r.sqnr_db, '.1f')} |")
    lines += ["", ("Agreement: top-1 of the Core AI runtime (Linux) vs onnxruntime's int8/fp8 kernels on the same QDQ "
                   "model; onnxruntime vs itself: its kernels vs the same QDQ graph run unoptimized (the floor any "
                   "second runtime meets: one-step rounding differences cascade).")]
    if any(r.top1 is None for r in rows):
        lines += ["— : Core ML packages do not run off macOS (storage is read from the package spec)."]
    notes = [f"- {r.backend} {r.preset}: {n}" for r in rows for n in r.notes]
    if notes:
        lines += ["", "Legalization notes:", *notes]
    return "\n".join(lines)
