#!/usr/bin/env python
"""Bias correction on and off: EfficientNet-Lite0 top-1, agreement with FP32 and logits SQNR (for the README).

Calibrates on the first 256 images of the shared ImageNet sample (name order), evaluates on the
other 244, for the presets int8, int8-global-minmax, w8 and w4 exactly as shipped (bias correction
on) and with ``bias_correction`` turned off; each finalized for onnxruntime, run with 2 threads.

    python scripts/bias_correction_table.py [--images DIR] [--out table.md]
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq_table import cpu_name, effnet_fp32_and_sample, emit, image_args  # scripts/ is on sys.path when run as a script

from qdq.demo import ptq_rows
from qdq.presets import preset

PRESETS = ("int8", "int8-global-minmax", "w8", "w4")


def main() -> int:
    args = image_args(__doc__)
    if args is None:
        return 1
    configs = {}
    for name in PRESETS:
        configs[f"{name} off"] = dataclasses.replace(preset(name), bias_correction=False)
        configs[f"{name} on"] = preset(name)
    with tempfile.TemporaryDirectory(prefix="qdq-bc-") as tmp:
        work = Path(tmp)
        _, _, fp32, calib_x, eval_x, eval_y = effnet_fp32_and_sample(work)
        rows = {r.name: r for r in ptq_rows(
            fp32, lambda: (calib_x[i:i + 32] for i in range(0, len(calib_x), 32)), eval_x, eval_y,
            configs=configs, out_dir=work, progress=False)}
    fp = rows["FP32"]
    caption = (f"EfficientNet-Lite0, calibrate on {len(calib_x)} / evaluate on {len(eval_x)} ImageNet-sample images "
               f"(FP32 top-1 {fp.top1:.2f} %); {datetime.date.today()}, {cpu_name()}, onnxruntime {ort.__version__}. "
               "Command: `python scripts/bias_correction_table.py`.")
    lines = [caption, "",
             "| preset | top-1 % off -> on | agreement with FP32 % off -> on | logits SQNR dB off -> on |",
             "|---|---:|---:|---:|"]
    for name in PRESETS:
        off, on = rows[f"{name} off"], rows[f"{name} on"]
        lines.append(f"| `{name}` | {off.top1:.2f} -> {on.top1:.2f} | {off.agreement:.2f} -> {on.agreement:.2f} | "
                     f"{off.sqnr_db:.1f} -> {on.sqnr_db:.1f} |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
