#!/usr/bin/env python
"""EfficientNet-Lite0 PTQ table on the shared ImageNet sample, for the README.

Calibrates on the first 256 images (name order), evaluates on the other 244, for the presets
int8 (moving_average), int8-global-minmax, fp8, w8 and w4; each finalized for onnxruntime.
Columns: top-1, agreement with FP32 (counted, and expected on new images: every FP32 margin against every
observed error, qdq.metrics.expected_agreement, and the 90 % range of the counted one under that error level,
qdq.metrics.agreement_interval), logits SQNR, file size, quantize time, onnxruntime speed
vs FP32 at batch 32 (interleaved runs, median, 2 threads) and float Conv/Gemm left.

    python scripts/ptq_table.py [--images DIR] [--out table.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the _bench package

from _bench.timing import speedups

from models import efficientnet as eff
from qdq.backends.ort_inspect import float_compute_nodes
from qdq.demo import ptq_rows
from qdq.torch_export import export


def _with(name: str, *algorithms: str, calibrator: str | None = None) -> Any:
    import dataclasses

    from qdq.config_edit import with_activation_calculator
    from qdq.presets import preset

    cfg = preset(name)
    if calibrator:
        cfg = with_activation_calculator(cfg, calibrator)
    return dataclasses.replace(cfg, algorithms=[*cfg.algorithms, *({"name": a} for a in algorithms)])


CONFIGS = {"W8A8 moving_average (int8)": "int8", "W8A8 global_minmax (int8-global-minmax)": "int8-global-minmax",
           "W8A8 + GPTQ (int8-gptq)": "int8-gptq",
           "W8A8 + AdaRound (int8 --algorithm adaround)": _with("int8", "adaround"),
           "W8A8 mse + AdaRound (int8 --calibrator mse --algorithm adaround)": _with("int8", "adaround", calibrator="mse"),
           "W8A8 asymmetric mse + GPTQ (int8-asymmetric --calibrator mse --algorithm gptq)": _with(
               "int8-asymmetric", "gptq", calibrator="mse"),
           "W8A8 + sequential bias correction (int8 --algorithm sequential_bias_correction)": _with(
               "int8", "sequential_bias_correction"),
           "W8A8 mse + AdaRound + sequential bias correction (int8 --calibrator mse --algorithm adaround "
           "--algorithm sequential_bias_correction)": _with("int8", "adaround", "sequential_bias_correction",
                                                            calibrator="mse"),
           "W8A8 asymmetric mse + GPTQ + sequential bias correction (int8-asymmetric --calibrator mse --algorithm "
           "gptq --algorithm sequential_bias_correction)": _with("int8-asymmetric", "gptq",
                                                                 "sequential_bias_correction", calibrator="mse"),
           "FP8 e4m3 (fp8)": "fp8", "W8 weight-only (w8)": "w8", "W4 per-block 32 (w4)": "w4",
           "W4 asymmetric + GPTQ (w4-gptq)": "w4-gptq",
           "W4 asymmetric + AdaRound (w4-gptq with adaround)": dataclasses.replace(
               _with("w4-gptq"), algorithms=[{"name": "adaround"}])}


def cpu_name() -> str:
    """CPU model name and core count (for the table's caption)."""
    import os

    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def image_args(doc: str | None) -> argparse.Namespace | None:
    """``--images DIR`` / ``--out FILE`` of the EfficientNet scripts; None (after a message) when the sample is absent."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--images", default=None, help="ImageNet sample folder (default ../shared/data/imagenet-sample)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    if args.images:
        import os

        os.environ["QDQ_IMAGENET_SAMPLE"] = args.images
    if eff.imagenet_sample_dir() is None:
        print("ImageNet sample not found (../shared/data/imagenet-sample); nothing to do", file=sys.stderr)
        return None
    return args


def effnet_fp32_and_sample(work: Path) -> tuple[Any, Any, Path, np.ndarray, np.ndarray, np.ndarray]:
    """(torch model, example, exported FP32 ONNX, calibration images, evaluation images, evaluation labels)."""
    model, example = eff.factory()
    fp32 = export(model, example, work / "efficientnet_lite0.onnx")
    calib_x, _ = eff.load_imagenet_sample("calib")
    eval_x, eval_y = eff.load_imagenet_sample("eval")
    return model, example, fp32, calib_x, eval_x, eval_y


def emit(text: str, out: str | None) -> None:
    """Print ``text`` and also write it to ``out`` when given."""
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main() -> int:
    args = image_args(__doc__)
    if args is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="qdq-ptq-") as tmp:
        work = Path(tmp)
        _, _, fp32, calib_x, eval_x, eval_y = effnet_fp32_and_sample(work)
        rows = ptq_rows(fp32, lambda: (calib_x[i:i + 32] for i in range(0, len(calib_x), 32)), eval_x, eval_y,
                        configs=CONFIGS, out_dir=work, progress=False)
        paths = sorted(work.glob("*-*.onnx"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        speed = speedups(fp32, paths, eval_x[:32], 7)
        floats = [len([n for n in float_compute_nodes(p) if n[1] in ("Conv", "Gemm")]) for p in paths]
    caption = (f"EfficientNet-Lite0, calibrate on {len(calib_x)} / evaluate on {len(eval_x)} ImageNet-sample images; "
               f"{datetime.date.today()}, {cpu_name()}, onnxruntime {ort.__version__}, "
               "2 threads. Command: `python scripts/ptq_table.py`.")
    lines = [caption, "",
             ("| config | top-1 % | agreement % | expected agreement % | 90 % range % | logits SQNR dB | file MB | "
              "quantize s | speed vs FP32 (b32) | float Conv/Gemm |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    r0 = rows[0]
    lines.append(f"| FP32 | {r0.top1:.2f} | 100.00 | 100.00 | — | — | {r0.size_mb:.1f} | — | 1.00x | — |")
    for r, s, f in zip(rows[1:], speed, floats):
        lines.append(f"| {r.name} | {r.top1:.2f} | {r.agreement:.2f} | {r.expected_agreement:.2f} | "
                     f"{r.agreement_range[0]:.2f}-{r.agreement_range[1]:.2f} | {r.sqnr_db:.1f} | "
                     f"{r.size_mb:.1f} | {r.seconds:.1f} | {s:.2f}x | {f} |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
