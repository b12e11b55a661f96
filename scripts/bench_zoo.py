"""Per-output SQNR of qdq presets vs onnxruntime.quantization.quantize_static on every zoo model.

For each model of ``models.zoo.ZOO``: export the FP32 ONNX file, draw 64 calibration samples
(seed 0) and 64 held-out evaluation samples of the same distribution (seed 1), then quantize with

* ``qdq quantize --preset int8`` and ``--preset int8-global-minmax`` (the CLI, default options);
* ``onnxruntime.quantization.quantize_static``: QDQ format, uint8 activations / int8 weights (U8S8),
  ``per_channel=True``, ``CalibrationMethod.MinMax``, the same calibration samples through a
  CalibrationDataReader (batches of 16, or of the model's static batch).

and report the SQNR of every output vs FP32 onnxruntime on the evaluation samples. A tool that
fails on a model gets its one-line error in the table instead of a number.

    python scripts/bench_zoo.py --out /tmp/zoo.md            # every model
    python scripts/bench_zoo.py --models bert,vit --work /tmp/zoo
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CALIB, EVAL, BATCH = 64, 64, 16
QDQ_ROWS = {"qdq int8": ["--preset", "int8"], "qdq int8-global-minmax": ["--preset", "int8-global-minmax"],
            "qdq int8-asymmetric": ["--preset", "int8-asymmetric"]}
ORT_ROW = "ORT U8S8 per-channel MinMax"

logger = logging.getLogger("bench_zoo")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def quantize_qdq(model: Path, calib: Path, out: Path, args: list[str]) -> str | None:
    """Run the qdq CLI in-process; None on success, else its error line."""
    from qdq.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--quiet", "quantize", str(model), "-o", str(out), "--calib-data", str(calib), *args])
    return None if rc == 0 else (err.getvalue().strip().splitlines() or [f"exit {rc}"])[-1][:160]


def quantize_ort(model: Path, calib: dict[str, np.ndarray], out: Path) -> str | None:
    """onnxruntime.quantization.quantize_static, U8S8 per-channel MinMax; None on success, else the error."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    shape = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else BATCH

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(calib.values())))
            self.it = iter({k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # noqa: BLE001 - a tool failing on a model is a result, not a crash of the benchmark
        return _one_line(exc)
    return None


def bench_model(name: str, work: Path) -> dict[str, Any]:
    """{'outputs': [...], 'rows': {row: {output: sqnr} | error str}, 'seconds': {row: s}} for one zoo model."""
    from models.zoo import ZOO
    from models.zoo.evaluate import run_onnx, sqnr_db

    zoo = ZOO[name]
    fp32 = zoo.export(work / f"{name}.onnx")
    calib, evaluation = zoo.data(CALIB, 0), zoo.data(EVAL, 1)
    np.savez(work / f"{name}.calib.npz", **calib)
    reference = run_onnx(fp32, evaluation)
    result: dict[str, Any] = {"outputs": list(reference), "rows": {}, "seconds": {}}
    jobs: list[tuple[str, Any]] = [
        (row, lambda out, a=args: quantize_qdq(fp32, work / f"{name}.calib.npz", out, a))
        for row, args in QDQ_ROWS.items()
    ]
    jobs.append((ORT_ROW, lambda out: quantize_ort(fp32, calib, out)))
    for row, job in jobs:
        out = work / f"{name}.{row.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        error = job(out)
        result["seconds"][row] = time.perf_counter() - start
        if error is None:
            try:
                quant = run_onnx(out, evaluation)
                result["rows"][row] = {k: sqnr_db(reference[k], quant[k]) for k in reference}
            except Exception as exc:  # noqa: BLE001 - an output that does not run is a result
                error = f"runs: {_one_line(exc)}"
        if error is not None:
            result["rows"][row] = error
        logger.info("%s %s: %s", name, row, result["rows"][row])
    return result


def _fmt(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.1f}"


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per (model, output): SQNR dB per tool, best-qdq minus ORT, and the tools' errors below."""
    rows = [*QDQ_ROWS, ORT_ROW]
    lines = ["| model | output | " + " | ".join(rows) + " | best qdq − ORT dB |",
             "|---|---|" + "---:|" * (len(rows) + 1)]
    notes: list[str] = []
    for name, res in results.items():
        for out in res["outputs"]:
            cells, qdq_best, ort_val = [], -math.inf, None
            for row in rows:
                val = res["rows"][row]
                if isinstance(val, str):
                    cells.append("fails¹" if row != ORT_ROW else "fails²")
                    notes.append(f"- {name}, {row}: `{val}`")
                    continue
                cells.append(_fmt(val[out]))
                if row == ORT_ROW:
                    ort_val = val[out]
                else:
                    qdq_best = max(qdq_best, val[out])
            delta = "—" if ort_val is None or qdq_best == -math.inf else f"{qdq_best - ort_val:+.1f}"
            lines.append(f"| {name} | {out} | " + " | ".join(cells) + f" | {delta} |")
    notes = list(dict.fromkeys(notes))
    return "\n".join(lines) + ("\n\nFailures (¹ qdq, ² onnxruntime):\n\n" + "\n".join(notes) if notes else "") + "\n"


def machine() -> str:
    """CPU model, cores and library versions, one line."""
    import onnxruntime
    import torch

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}; Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, numpy {np.__version__}")


def main(argv: list[str] | None = None) -> int:
    from models.zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names (default: all)")
    parser.add_argument("--work", default=None, help="folder for models and data (default: a temp folder)")
    parser.add_argument("--out", default=None, help="write the markdown section here (default: stdout only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {name: bench_model(name, work) for name in args.models.split(",")}
    command = "python scripts/bench_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
            f"- Machine: {machine()}\n- Command: `{command.strip()}`\n\n" + markdown(results))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
