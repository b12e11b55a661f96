"""The markdown report: the accuracy/speed table, the scaling table, the targets and the machine line."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from _bench.rows import LABELS, ROWS, Row
from _bench.steps import Step

# ----------------------------------------------------------------------------- report


def _f(v: float, spec: str, suffix: str = "") -> str:
    if isinstance(v, float) and math.isnan(v):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec) + suffix


def fmt_row(r: Row) -> str:
    return (f"{_f(r.seconds, '.1f')} s, {_f(r.peak_mb, '.0f')} MB, top-1 {_f(r.top1, '.2f')}, agree "
            f"{_f(r.agreement, '.2f')}, {_f(r.sqnr, '.1f')} dB, x{_f(r.speed_b1, '.2f')} / x{_f(r.speed_b32, '.2f')}, "
            f"float convs {_f(r.float_convs, '.0f')} {r.note}")


def table(results: Sequence[Row]) -> str:
    lines = [("| row | quantize wall s | peak RSS MB | top-1 % | agreement with FP32 % | logits SQNR dB | "
              "ORT speed vs FP32, batch 1 | batch 32 | float Conv/Gemm left |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        label = "FP32 (onnxruntime)" if r.name == "fp32" else LABELS[r.name]
        if r.note:
            label += f" — {r.note}"
        lines.append(f"| {label} | {_f(r.seconds, '.1f')} | {_f(r.peak_mb, '.0f')} | {_f(r.top1, '.2f')} | "
                     f"{_f(r.agreement, '.2f')} | {_f(r.sqnr, '.1f')} | {_f(r.speed_b1, '.2f', 'x')} | "
                     f"{_f(r.speed_b32, '.2f', 'x')} | {_f(r.float_convs, '.0f')} |")
    return "\n".join(lines)


def scaling_table(scale: dict[str, dict[int, Step]], sizes: Sequence[int], distinct: int) -> str:
    """Wall seconds / peak MB per row and sample count; ``distinct``: calibration images there are
    (larger counts cycle through them again, see :func:`_bench.rows.calib_folder`)."""
    def label(n: int) -> str:
        return f"{n} samples" if n <= distinct else f"{n} samples ({distinct} images, each used {n / distinct:.3g}x)"

    head = "| row | " + " | ".join(f"{label(n)}: s / MB" for n in sizes) + " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for name, steps in scale.items():
        cells = []
        for n in sizes:
            s = steps.get(n)
            if s is None or not s.ok:
                cells.append(s.note if s is not None else "—")
            else:
                cells.append(f"{s.seconds:.1f} / {s.peak_mb:.0f}")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: Sequence[Row]) -> list[str]:
    """The issue's targets, checked on this run's rows (missing rows are reported as not measured)."""
    by = {r.name: r for r in results}
    out: list[str] = []

    def get(name: str, attr: str) -> float:
        r = by.get(name)
        return getattr(r, attr) if r is not None else math.nan

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- {'met' if ok else ('not measured' if ok is None else 'MISSED')}: {text}")

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan

    ort_minmax = min((get(n, "seconds") for n in ("ort-minmax-s8s8", "ort-minmax-u8s8")
                      if not math.isnan(get(n, "seconds"))), default=math.nan)
    q = ratio(get("qdq-global_minmax", "seconds"), ort_minmax)
    line(None if math.isnan(q) else q <= 0.5, f"qdq global_minmax time {_f(q, '.2f')}x onnxruntime MinMax (target <= 0.5x)")
    for mine, refs in (("qdq-percentile", ["ort-percentile-u8s8"]), ("qdq-entropy", ["ort-entropy-u8s8"]),
                       ("qdq-mse", ["ort-percentile-u8s8", "ort-entropy-u8s8"])):
        base = min((get(n, "seconds") for n in refs if not math.isnan(get(n, "seconds"))), default=math.nan)
        q = ratio(get(mine, "seconds"), base)
        line(None if math.isnan(q) else q <= 0.2,
             f"{mine} time {_f(q, '.2f')}x onnxruntime {'/'.join(t.split('-')[1] for t in refs)} (target <= 0.2x)")
    qdq_rows = [r for r in results if r.name.startswith("qdq-")]
    peaks = [r.peak_mb for r in qdq_rows if not math.isnan(r.peak_mb)]
    if peaks:
        line(max(peaks) < 500, f"qdq peak RSS max {max(peaks):.0f} MB over {len(peaks)} rows (target < 500 MB)")
    ort_best_b32 = max((get(n, "speed_b32") for n in ROWS if n.startswith("ort-") and not math.isnan(get(n, "speed_b32"))),
                       default=math.nan)
    for r in qdq_rows:
        if r.name == "qdq-fp8" or math.isnan(r.speed_b32):
            continue
        ok = r.speed_b32 >= 2.0 and (math.isnan(ort_best_b32) or r.speed_b32 >= ort_best_b32) and r.float_convs == 0
        line(ok, f"{r.name}: {r.speed_b32:.2f}x FP32 at batch 32 (onnxruntime best {_f(ort_best_b32, '.2f')}x), "
                 f"{r.float_convs:.0f} float Conv/Gemm (target >= 2.0x, >= onnxruntime, 0)")
    ort_rows = [r for r in results if r.name.startswith("ort-") and not math.isnan(r.agreement)]
    int8_qdq = [r for r in qdq_rows if r.name != "qdq-fp8" and not math.isnan(r.agreement)]
    if ort_rows and int8_qdq:
        best = max(int8_qdq, key=lambda r: (r.agreement, r.sqnr))
        ort_agree = max(r.agreement for r in ort_rows)
        ort_sqnr = max(r.sqnr for r in ort_rows)
        line(best.agreement >= ort_agree and best.sqnr >= ort_sqnr,
             f"best qdq row {best.name}: agreement {best.agreement:.2f} % / {best.sqnr:.1f} dB vs best onnxruntime "
             f"{ort_agree:.2f} % / {ort_sqnr:.1f} dB")
    for mine, theirs in (("qdq-moving_average", "coreai-moving_average"), ("qdq-global_minmax", "coreai-global_minmax"),
                         ("qdq-fp8", "coreai-fp8")):
        a, b = by.get(mine), by.get(theirs)
        if a is None or b is None or math.isnan(a.agreement) or math.isnan(b.agreement):
            line(None, f"{mine} vs {theirs}")
            continue
        line(a.agreement >= b.agreement and a.sqnr >= b.sqnr,
             f"{mine} {a.agreement:.2f} % / {a.sqnr:.1f} dB vs {theirs} {b.agreement:.2f} % / {b.sqnr:.1f} dB")
    return out


def machine() -> str:
    import psutil

    model = platform.processor() or "?"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        for ln in text.splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
            if ln.startswith("flags"):
                have = set(ln.split(":", 1)[1].split())
                flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in have)
                break
    except OSError:
        pass
    import coreai_opt
    import onnxruntime
    import torch

    return (f"{model}, {os.cpu_count()} cores ({flags}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}, onnxruntime "
            f"{onnxruntime.__version__}, numpy {np.__version__}, torch {torch.__version__}, coreai_opt "
            f"{getattr(coreai_opt, '__version__', '?')}")
