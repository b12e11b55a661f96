"""Evaluating the quantized models: top-1, agreement and logits SQNR vs FP32, float convolutions left
in onnxruntime's optimized graph, interleaved speed runs; the accuracy table and the scaling runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _bench.report import fmt_row
from _bench.rows import EVAL_BATCH, FLOAT_CONV_OPS, ROWS, Row, calib_folder
from _bench.steps import Step, quantize_rounds
from _bench.timing import session
from _bench.timing import speedups as timed_speedups

# ----------------------------------------------------------------------------- evaluation


def logits_of(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + EVAL_BATCH]})[0] for i in range(0, len(x), EVAL_BATCH)])


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - test) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref ** 2)) / noise)


def speedups(fp32: Path, models: dict[str, Path], x: np.ndarray, runs: dict[int, int]) -> dict[str, dict[int, float]]:
    """median(FP32 time) / median(model time) per model and batch size (round-robin, see _bench.timing)."""
    out: dict[str, dict[int, float]] = {k: {} for k in models}
    for batch, count in runs.items():
        xb = np.ascontiguousarray(x[:batch])
        reps = max(1, 16 // batch)  # batch 1: time 16 inferences per sample, above timer noise
        ratios = timed_speedups(fp32, list(models.values()), xb, count, runs_per_sample=reps)
        for k, r in zip(models, ratios, strict=True):
            out[k][batch] = r
    return out


def float_convs(path: Path) -> int:
    from qdq.backends.ort_inspect import optimized_model

    return sum(1 for n in optimized_model(path).graph.node if n.op_type in FLOAT_CONV_OPS)


# ----------------------------------------------------------------------------- main benchmark


def export_fp32(work: Path) -> Path:
    path = work / "efficientnet_lite0.onnx"
    if not path.exists():
        from models import efficientnet as eff
        from qdq.torch_export import export

        model, example = eff.factory()
        export(model, example, path)
    return path


def evaluate(rows: Sequence[str], work: Path, n: int, speed_runs: dict[int, int], repeat: int,
             log: Any) -> list[Row]:
    from models import efficientnet as eff

    fp32 = export_fp32(work)
    calib = calib_folder(work, n)
    eval_x, eval_y = eff.load_imagenet_sample("eval")
    ref = logits_of(fp32, eval_x)
    results = [Row("fp32", top1=100 * float((ref.argmax(1) == eval_y).mean()), agreement=100.0, sqnr=math.inf,
                   speed_b1=1.0, speed_b32=1.0, float_convs=float_convs(fp32))]
    log(f"FP32: top-1 {results[0].top1:.2f}, float Conv/Gemm {results[0].float_convs}")
    timed: dict[str, Path] = {}
    for name, (step, out) in quantize_rounds(rows, fp32, calib, n, work, repeat, "", log).items():
        tool = ROWS[name][0]
        row = Row(name, note=step.note)
        if tool != "coreai":
            row.seconds, row.peak_mb = step.seconds, step.peak_mb
        if step.ok:
            logits = np.load(out) if tool == "coreai" else logits_of(out, eval_x)
            row.top1 = 100 * float((logits.argmax(1) == eval_y).mean())
            row.agreement = 100 * float((logits.argmax(1) == ref.argmax(1)).mean())
            row.sqnr = sqnr_db(ref, logits)
            if tool != "coreai":
                row.float_convs = float_convs(out)
                timed[name] = out
        results.append(row)
        log(f"{name}: {fmt_row(row)}")
    if timed:
        log(f"timing FP32 and {len(timed)} quantized models (interleaved) ...")
        sp = speedups(fp32, timed, eval_x, speed_runs)
        for row in results:
            if row.name in sp:
                row.speed_b1, row.speed_b32 = sp[row.name][1], sp[row.name][32]
    return results


def scaling(rows: Sequence[str], work: Path, sizes: Sequence[int], repeat: int,
            log: Any) -> dict[str, dict[int, Step]]:
    fp32 = export_fp32(work)
    table: dict[str, dict[int, Step]] = {}
    onnx_rows = [r for r in rows if ROWS[r][0] != "coreai"]
    for n in sizes:
        for name, (step, out) in quantize_rounds(onnx_rows, fp32, calib_folder(work, n), n, work, repeat, "scale-",
                                                 log).items():
            table.setdefault(name, {})[n] = step
            out.unlink(missing_ok=True)
    return table
