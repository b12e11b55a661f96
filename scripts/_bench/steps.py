"""One quantize step per child process (onnxruntime / coreai_opt children, the qdq CLI), measured from
outside: wall seconds and the child's own peak RSS (``os.wait4``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _bench.rows import BATCH, EVAL_BATCH, MEAN, ORT_HISTOGRAM_BYTES_PER_SAMPLE, ROOT, ROWS, STD, THREADS, image_batches

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


def quantize_rounds(rows: Sequence[str], fp32: Path, calib: Path, n: int, work: Path, repeat: int, tag: str,
                    log: Any) -> dict[str, tuple[Step, Path]]:
    """Quantize every row ``repeat`` times in round-robin rounds (row 1, row 2, ..., row 1, ...): a slow
    spell of the (shared) machine then hits every row alike. Median wall seconds, largest peak RSS;
    coreai_opt rows (accuracy only) run in the first round only."""
    steps: dict[str, list[Step]] = {r: [] for r in rows}
    outs: dict[str, Path] = {}
    for k in range(max(1, repeat)):
        for name in rows:
            tool = ROWS[name][0]
            if (k and tool == "coreai") or (steps[name] and not steps[name][-1].ok):
                continue
            outs[name] = work / (f"{tag}{name}-{n}.npy" if tool == "coreai" else f"{tag}{name}-{n}.onnx")
            step = quantize_step(name, fp32, calib, n, outs[name], work / f"{tag}{name}-{n}.log")
            steps[name].append(step)
            log(f"{tag}{name} n={n} round {k + 1}: {step.seconds:.2f} s, {step.peak_mb:.0f} MB {step.note}")
    merged = {}
    for name, done in steps.items():
        if not done[-1].ok:
            merged[name] = (done[-1], outs[name])
        else:
            merged[name] = (Step(statistics.median(s.seconds for s in done), max(s.peak_mb for s in done), True),
                            outs[name])
    return merged


def quantize_step(row: str, fp32: Path, calib: Path, n: int, out: Path, log: Path) -> Step:
    tool, settings = ROWS[row]
    if tool == "qdq":
        cmd = [*qdq_executable(), "--quiet", "quantize", str(fp32), "-o", str(out), "--calib-data", str(calib),
               "--num-samples", str(n), "--batch-size", str(BATCH), "--mean", str(MEAN), "--std", str(STD),
               *settings["args"]]
    else:
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_vs_ort.py"), "--child", row, "--model", str(fp32),
               "--calib-dir", str(calib), "--output", str(out)]
    if tool == "ort" and settings["method"] != "MinMax":
        import psutil

        need = n * ORT_HISTOGRAM_BYTES_PER_SAMPLE + 2e9
        avail = psutil.virtual_memory().available
        if avail < need:
            return Step(math.nan, math.nan, False, f"skipped: needs ~{need / 1e9:.0f} GB, {avail / 1e9:.0f} GB available")
    return run_measured(cmd, log)
