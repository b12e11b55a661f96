#!/usr/bin/env python
"""EfficientNet-Lite0 through the real Apple converters: Core ML (.mlpackage) and Core AI (.aimodel).

Calibrates on the first 256 ImageNet-sample images, evaluates on the other 244. Rows:
Core ML int8 (iOS17) and w4 (iOS18): weight ops and stored dtypes read from the package, size vs the
FP32 conversion; Core AI int8 and fp8: the same, plus the Core AI runtime (on Linux) top-1,
agreement with onnxruntime on the same QDQ model, SQNR vs FP32. Also times the refusal of
``--preset fp8 --backend coreml`` by the CLI.

    python scripts/apple_backends.py [--images DIR] [--out table.md]
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq_table import cpu_name, effnet_fp32_and_sample, emit, image_args  # scripts/ is on sys.path when run as a script

from qdq.backend_eval import backend_rows, format_backend_table, logits, ort_runner

CASES = [("coreml", "int8", {"deployment_target": "iOS17"}), ("coreml", "w4", {"deployment_target": "iOS18"}),
         ("coreai", "int8", {}), ("coreai", "fp8", {})]


def fp32_mlpackage_mb(model, example, out: Path) -> float:
    """Size of the FP32 model converted by coremltools (float32 weights, iOS17): the size baseline."""
    import coremltools as ct
    import torch

    ep = torch.export.export(model.eval(), example).run_decompositions({})
    ml = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                    compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    ml.save(str(out))
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6


def refusal_seconds(fp32: Path, work: Path) -> tuple[float, str]:
    """Wall time and last stderr line of ``qdq quantize --preset fp8 --backend coreml`` (it must refuse)."""
    calib = work / "calib.npy"
    np.save(calib, np.zeros((2, 3, 224, 224), np.float32))
    cmd = [sys.executable, "-m", "qdq.cli", "quantize", str(fp32), "--preset", "fp8", "--backend", "coreml",
           "--calib-data", str(calib), "-o", str(work / "refused.mlpackage"), "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    return seconds, f"exit {done.returncode}: {lines[-1] if lines else ''}"


def main() -> int:
    args = image_args(__doc__)
    if args is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="qdq-apple-") as tmp:
        work = Path(tmp)
        model, example, fp32, calib_x, eval_x, eval_y = effnet_fp32_and_sample(work)
        refuse_s, refuse_msg = refusal_seconds(fp32, work)
        fp32_mb = fp32_mlpackage_mb(model, example, work / "fp32.mlpackage")
        fp32_top1 = float((logits(ort_runner(fp32), eval_x, 32).argmax(-1) == eval_y).mean() * 100)
        rows = backend_rows(fp32, lambda: (calib_x[i:i + 32] for i in range(0, len(calib_x), 32)), eval_x, eval_y,
                            CASES, work)
    title = (f"EfficientNet-Lite0 on Core ML / Core AI (calibrate {len(calib_x)}, evaluate {len(eval_x)} "
             f"ImageNet-sample images; {datetime.date.today()}, {cpu_name()}; "
             "`python scripts/apple_backends.py`)")
    lines = [format_backend_table(rows, title, fp32_top1), "",
             f"FP32 Core ML conversion (iOS17, float32 weights): {fp32_mb:.2f} MB; "
             + "; ".join(f"{r.backend} {r.preset}: {100 * r.size_mb / fp32_mb:.1f} % of it" for r in rows), "",
             f"`qdq quantize --preset fp8 --backend coreml`: refused in {refuse_s:.1f} s ({refuse_msg})"]
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
