#!/usr/bin/env python
"""onnxruntime kernel format on this CPU: EfficientNet-Lite0 int8 and int8-asymmetric finalized with int8 weights
(u8s8) and uint8 weights (u8u8), run with all onnxruntime optimizations (its integer kernels).

Prints whether this CPU's U8S8 kernels saturate (x86 without VNNI/AMX: qdq.backends.host_cpu), then for each
format: logits SQNR and top-1 agreement vs FP32 on the 244 evaluation images, the same against the model's
reference semantics (no onnxruntime fusion), the speed vs FP32 at batch 32 (interleaved runs, median, 2
threads) and how many Conv/Gemm run in float. Then every zoo model in both formats against its reference
semantics.

    python scripts/kernel_format.py [--images DIR] [--out table.md]
"""

from __future__ import annotations

import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench.timing import speedups
from ptq_table import cpu_name, effnet_fp32_and_sample, emit, image_args

from qdq.backends.host_cpu import u8s8_saturates
from qdq.backends.ort_inspect import float_compute_nodes
from qdq.metrics import sqnr_db
from qdq.model_io import save
from qdq.quantizer import Quantizer
from qdq.session import make_session


def _logits(path: Path, x: np.ndarray, level: str) -> np.ndarray:
    s = make_session(path, level=level)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def main() -> int:
    args = image_args(__doc__)
    if args is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="qdq-kf-") as tmp:
        work = Path(tmp)
        _, _, fp32, calib_x, eval_x, _ = effnet_fp32_and_sample(work)
        ref = _logits(fp32, eval_x, "all")
        cases, paths = [], []
        for preset in ("int8", "int8-asymmetric"):
            q = Quantizer(fp32, preset)
            q.progress = False
            q.prepare()
            q.calibrate((calib_x[i:i + 32] for i in range(0, len(calib_x), 32)), progress=False)
            for fmt in ("u8s8", "u8u8"):
                cases.append((preset, fmt))
                paths.append(save(q.finalize(kernel_format=fmt), work / f"{preset}-{fmt}.onnx"))
        speed = speedups(fp32, paths, eval_x[:32], 7)
        rows = []
        for (preset, fmt), path, s in zip(cases, paths, speed, strict=True):
            fused, exact = _logits(path, eval_x, "all"), _logits(path, eval_x, "none")
            floats = len([n for n in float_compute_nodes(path) if n[1] in ("Conv", "Gemm")])
            rows.append(f"| {preset} | {fmt} | {sqnr_db(ref, fused):.1f} | "
                        f"{np.mean(fused.argmax(1) == ref.argmax(1)) * 100:.2f} | {sqnr_db(ref, exact):.1f} | "
                        f"{s:.2f}x | {floats} |")
    caption = (f"EfficientNet-Lite0, calibrate on {len(calib_x)} / evaluate on {len(eval_x)} images; "
               f"{datetime.date.today()}, {cpu_name()}, onnxruntime {ort.__version__}; U8S8 kernels saturate on "
               f"this CPU: {'yes' if u8s8_saturates() else 'no'}. Command: `python scripts/kernel_format.py`.")
    lines = [caption, "",
             ("| preset | kernel format | logits SQNR dB (onnxruntime kernels) | agreement % | SQNR dB (reference "
              "semantics) | speed vs FP32 (b32) | float Conv/Gemm |"),
             "|---|---|---:|---:|---:|---:|---:|", *rows]
    lines += ["", _zoo_rows()]
    emit("\n".join(lines), args.out)
    return 0


def _zoo_rows() -> str:
    """Every zoo model (static batch, int64 inputs, float16, opset 11, transformers, GRU), int8, both formats,
    and the reference semantics (the prepared QDQ graph run unoptimized)."""
    from models.zoo import ZOO
    from qdq.model_inputs import model_inputs
    from qdq.model_io import load_model
    from qdq.session import run_batched

    rows = []
    with tempfile.TemporaryDirectory(prefix="qdq-kf-zoo-") as tmp:
        for name, zoo in ZOO.items():
            path = zoo.export(Path(tmp) / f"{name}.onnx")
            calib, evaluation = zoo.data(64, 0), zoo.data(64, 1)

            def run(model: object, data: dict[str, np.ndarray] = evaluation, level: str = "all") -> np.ndarray:
                loaded = load_model(model)
                inputs = model_inputs(loaded)
                return np.asarray(run_batched(make_session(loaded, level=level), inputs.feeds(data), inputs)[0])

            ref = run(str(path))
            q = Quantizer(path, "int8")
            q.progress = False
            q.apply_algorithms([calib])
            q.prepare()
            q.calibrate([calib], progress=False)
            dbs = [sqnr_db(ref, run(q.finalize(kernel_format=fmt))) for fmt in ("u8s8", "u8u8")]
            rows.append(f"| {name} | {dbs[0]:.1f} | {dbs[1]:.1f} | {sqnr_db(ref, run(q.qdq_model(), level='none')):.1f} |")
    return "\n".join(["Zoo models (models/zoo), int8, 64 calibration / 64 evaluation samples, first output's SQNR vs FP32:",
                      "", "| model | u8s8 dB | u8u8 dB | reference semantics dB |", "|---|---:|---:|---:|", *rows])

if __name__ == "__main__":
    sys.exit(main())
