"""Rerun AMD Quark's ONNX post-training W8A8 quantization on our EfficientNet-Lite0 split.

Quantizes an FP32 ONNX model with Quark (uint8 asymmetric activations, int8 symmetric per-channel
weights, float scales, QDQ for onnxruntime CPU), times it and records peak RSS, then evaluates the
result in onnxruntime CPU (2 intra-op threads) against the FP32 model on the evaluation images and
prints one markdown table row:

    | recipe | top-1 % | agreement % | logits SQNR dB | quantize s | peak RSS GB | float Conv/Gemm |

Recipes:
    plain  MinMax calibration, no CLE, no AdaRound.
    best   MinMax calibration + CLE (CLEConfig defaults) + AdaRound fast finetune with the parameters of
           Quark's U8S8_AAWS_ADAROUND / INT8_CNN_ACCURATE presets (1000 iterations per layer, batch 2,
           lr 0.1, early stop); ``--iters`` overrides the iteration count.

It runs in its own venv, never in the project's (amd-quark pins onnx and onnxruntime versions):

    python3 -m venv /tmp/quark-venv
    /tmp/quark-venv/bin/pip install torch==2.13.0          # CPU wheel first, so no CUDA build is pulled
    /tmp/quark-venv/bin/pip install amd-quark==0.13 onnxruntime==1.28.0

Run:

    /tmp/quark-venv/bin/python scripts/bench_quark.py --fp32 /tmp/exp/fp32.onnx --calib /tmp/exp/calib.npy \\
        --eval /tmp/exp/eval.npy --labels /tmp/exp/evaly.npy --out-dir /tmp/quark-out --recipe best

Inputs are float32 NCHW arrays already preprocessed for the model; labels are int class ids.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import quark
from quark.onnx import (
    AdaRoundConfig,
    CalibMethod,
    CalibrationDataReader,
    CLEConfig,
    Int8Spec,
    ModelQuantizer,
    QConfig,
    QLayerConfig,
    QuantGranularity,
    UInt8Spec,
)

FLOAT_OPS = {"Conv", "Gemm", "FusedConv", "FusedGemm"}


class BatchReader(CalibrationDataReader):
    """Feeds the calibration images to Quark in fixed-size batches."""

    def __init__(self, name: str, data: np.ndarray, batch_size: int) -> None:
        self.batches = iter([{name: data[i : i + batch_size]} for i in range(0, len(data), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def make_config(recipe: str, iters: int) -> QConfig:
    layer = QLayerConfig(
        input_tensors=UInt8Spec(symmetric=False, calibration_method=CalibMethod.MinMax),
        weight=Int8Spec(
            symmetric=True, calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel
        ),
    )
    algos = []
    if recipe == "best":
        algos = [
            CLEConfig(),
            AdaRoundConfig(num_iterations=iters, batch_size=2, learning_rate=0.1, early_stop=True),
        ]
    return QConfig(global_config=layer, algo_config=algos, extra_options={"ForceQuantizeNoInputCheck": True})


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb / 1024**2


def session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def float_conv_gemm(path: Path) -> int:
    """Conv/Gemm nodes left in float after onnxruntime's graph optimizations (QLinear* are quantized)."""
    return sum(n.op_type in FLOAT_OPS for n in onnx.load(str(path)).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--recipe", choices=["plain", "best"], required=True)
    ap.add_argument("--iters", type=int, default=1000, help="AdaRound iterations per layer (best recipe)")
    ap.add_argument("--batch-size", type=int, default=16, help="calibration batch size")
    args = ap.parse_args()

    for name in ("fp32", "calib", "eval", "labels", "out_dir"):
        setattr(args, name, getattr(args, name).resolve())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out_dir)  # Quark appends a quantized_info.csv log to the working directory
    label = args.recipe if args.recipe == "plain" else f"best-{args.iters}"
    qpath = args.out_dir / f"quark_{label}.onnx"
    input_name = onnx.load(str(args.fp32), load_external_data=False).graph.input[0].name
    calib = np.load(args.calib).astype(np.float32)

    config = make_config(args.recipe, args.iters)
    t0 = time.perf_counter()
    ModelQuantizer(config).quantize_model(str(args.fp32), str(qpath), BatchReader(input_name, calib, args.batch_size))
    quant_s = time.perf_counter() - t0
    rss_gb = peak_rss_gb()
    del calib

    x = np.load(args.eval).astype(np.float32)
    y = np.load(args.labels).astype(np.int64)
    ref = logits(session(args.fp32), x)
    opt_path = args.out_dir / f"quark_{label}.ort_optimized.onnx"
    q = logits(session(qpath, opt_path), x)

    result = {
        "recipe": f"Quark {args.recipe}" + (f" (AdaRound {args.iters} it/layer)" if args.recipe == "best" else ""),
        "top1": float((q.argmax(-1) == y).mean() * 100),
        "agreement": float((q.argmax(-1) == ref.argmax(-1)).mean() * 100),
        "sqnr_db": float(10 * np.log10((ref**2).sum() / ((ref - q) ** 2).sum())),
        "quantize_s": quant_s,
        "peak_rss_gb": rss_gb,
        "float_conv_gemm": float_conv_gemm(opt_path),
        "fp32_top1": float((ref.argmax(-1) == y).mean() * 100),
        "versions": {"amd-quark": quark.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
    }
    (args.out_dir / f"quark_{label}.json").write_text(json.dumps(result, indent=2))
    print(
        f"| {result['recipe']} | {result['top1']:.1f} | {result['agreement']:.1f} | {result['sqnr_db']:.1f} "
        f"| {quant_s:.0f} | {rss_gb:.1f} | {result['float_conv_gemm']} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
