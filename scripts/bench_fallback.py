"""Automatic fallback on EfficientNet-Lite0: `--target-agreement` on the calibration samples, judged on held-out photos.

    python scripts/bench_fallback.py [--target 99.5] [--preset int8] [--calibrator mse] [--algorithm adaround]
                                     [--out table.md]

Calibrates on the first 256 ImageNet-sample images (../shared/data/imagenet-sample), searches the fallback
on them (``holdout`` 256), evaluates the chosen model and the fully quantized one on the other 244 photos
(top-1, agreement, logits SQNR), and reports the ops left float, the search time and peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ptq_table import cpu_name, effnet_fp32_and_sample, emit


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--target", type=float, default=99.5, help="top-1 agreement with FP32, %%")
    parser.add_argument("--preset", default="int8")
    parser.add_argument("--calibrator", default=None, help="replace every activation calculator (e.g. mse)")
    parser.add_argument("--algorithm", action="append", default=None,
                        help="algorithm(s): adaround, gptq, cle (before calibration), sequential_bias_correction (after); repeatable")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from models import efficientnet as eff

    if eff.imagenet_sample_dir() is None:
        print("ImageNet sample not found (../shared/data/imagenet-sample); nothing to do", file=sys.stderr)
        return 1
    import qdq
    from qdq.session import make_session

    with tempfile.TemporaryDirectory(prefix="qdq-fallback-") as tmp:
        work = Path(tmp)
        _, _, fp32, calib_x, eval_x, eval_y = effnet_fp32_and_sample(work)

        def logits(path: Path) -> np.ndarray:
            s = make_session(path)
            name = s.get_inputs()[0].name
            return np.concatenate([s.run(None, {name: eval_x[i:i + 32]})[0] for i in range(0, len(eval_x), 32)])

        batches = [calib_x[i:i + 32] for i in range(0, len(calib_x), 32)]
        plain = work / "plain.onnx"
        algorithms = [{"name": a} for a in args.algorithm or []]
        qdq.quantize(fp32, args.preset, batches, output=plain, progress=False, calibrator=args.calibrator,
                     algorithms=algorithms)
        found: list = []
        start = time.perf_counter()
        chosen = work / "fallback.onnx"
        qdq.quantize(fp32, args.preset, batches, output=chosen, progress=False, target_agreement=args.target,
                     calibrator=args.calibrator, algorithms=algorithms, holdout=len(calib_x),
                     on_fallback=found.append)
        seconds = time.perf_counter() - start
        ref = logits(fp32)
        top2 = np.sort(ref, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]  # FP32's top-1 minus top-2 logit: a near-tie flips under any noise
        rows, flips = [], []
        for label, path in (("fully quantized", plain), ("with fallback", chosen)):
            out = logits(path)
            flipped = np.flatnonzero(out.argmax(1) != ref.argmax(1))
            flips.append(f"{label}: {len(flipped)} flipped, FP32 margins "
                         f"{', '.join(f'{margin[i]:.3f}' for i in flipped) or '-'}")
            sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2))
            rows.append(f"| {label} | {100 * (out.argmax(1) == eval_y).mean():.2f} | "
                        f"{100 * (out.argmax(1) == ref.argmax(1)).mean():.2f} | {sqnr:.1f} |")
    r = found[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    how = f"--preset {args.preset}" + (f" --calibrator {args.calibrator}" if args.calibrator else "") + "".join(
        f" --algorithm {a}" for a in args.algorithm or [])
    lines = [(f"EfficientNet-Lite0 `{how} --target-agreement {args.target}`: calibrate and search on "
             f"{len(calib_x)} ImageNet-sample images, evaluate on the other {len(eval_x)}; {datetime.date.today()}, "
             f"{cpu_name()}. Command: `python scripts/bench_fallback.py {how} --target {args.target}`."), "",
             f"Search: {r.summary()}; {seconds:.0f} s including calibration, peak RSS {peak:.2f} GB.", "",
             "| model (held-out photos) | top-1 % | agreement with FP32 % | logits SQNR dB |", "|---|---:|---:|---:|",
             f"| FP32 | {100 * (ref.argmax(1) == eval_y).mean():.2f} | 100.00 | — |", *rows, "",
             (f"Held-out photos whose top-1 flips (FP32 top-1 minus top-2 logit; logits' std {ref.std():.2f}, "
             f"smallest margins {', '.join(f'{m:.3f}' for m in np.sort(margin)[:5])}): {'; '.join(flips)}.")]
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
