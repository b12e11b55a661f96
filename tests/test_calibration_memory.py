"""Calibration memory stays flat in the number of samples, measured as each child process's own peak.

Each run is a fresh ``python -c`` process (fork + exec) that runs ``qdq quantize`` and then reads
its own VmHWM from /proc/self/status: exec gives the child a new address space, so its high-water
mark is its own. (``getrusage(RUSAGE_SELF).ru_maxrss`` would not do: Linux carries the parent's
peak across fork/exec, so a child of a large pytest process reports pytest's peak.) A calculator
that keeps every batch must break the bound, or the bound proves nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc (VmHWM)")

SAMPLE_MB = 3 * 96 * 96 * 4 / 2**20  # one input sample (the .npy is memory-mapped: its pages count in RSS)
#: 512 - 64 samples keep 448 * 1.3 MB = 580 MB of activations alive if a calculator keeps them;
#: streamed, the peak may grow only by the input pages mapped (448 * 0.1 MB) plus 50 MB of allocator noise.
BOUND_MB = 50 + (512 - 64) * SAMPLE_MB

_CHILD = """
import sys
import numpy as np
from qdq.calibration import QParamsCalculatorBase, RangeCalculatorBase


@QParamsCalculatorBase.register("test_keep_every_batch")
class KeepEveryBatch(RangeCalculatorBase):
    '''Keeps a copy of every batch it observes: the memory leak the bound must catch.'''

    def __init__(self, spec, layout, **kwargs):
        super().__init__(spec, layout, **kwargs)
        self.kept = []

    def observe(self, x):
        self.kept.append(np.array(x, copy=True))
        self.min_val = np.float32(min(float(x.min()), 0.0 if self.min_val is None else float(self.min_val)))
        self.max_val = np.float32(max(float(x.max()), 0.0 if self.max_val is None else float(self.max_val)))
        self.num_batches += 1


from qdq.cli import main

code = main(sys.argv[1:])
assert code == 0, code
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(peak_kb)
"""


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Conv+Relu model (32 channels at 96x96) and 512 random samples in a .npy."""
    from onnx import TensorProto, helper, numpy_helper

    tmp = tmp_path_factory.mktemp("memory")
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 96, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 96, 96])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp / "m.onnx")
    data = np.lib.format.open_memmap(tmp / "x.npy", mode="w+", dtype=np.float32, shape=(512, 3, 96, 96))
    data[:] = rng.standard_normal(data.shape).astype(np.float32)
    del data
    return tmp / "m.onnx", tmp / "x.npy"


def _peak_mb(model: Path, data: Path, n: int, out: Path, *extra: str) -> float:
    """Peak RSS (MB) of a fresh process quantizing ``model`` on the first ``n`` samples of ``data``."""
    res = subprocess.run([sys.executable, "-c", _CHILD, "--quiet", "quantize", str(model), "-o", str(out),
                          "--calib-data", str(data), "--num-samples", str(n), "--batch-size", "16", *extra],
                         check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1]) / 1024


@pytest.mark.parametrize("calibrator", ["moving_average", "global_minmax", "percentile"])
def test_calibration_memory_is_flat(conv_model: tuple[Path, Path], tmp_path: Path, calibrator: str) -> None:
    """Peak RSS for 512 samples stays within BOUND_MB of 64 samples (data streamed, statistics only)."""
    model, data = conv_model
    peaks = {n: _peak_mb(model, data, n, tmp_path / f"q{n}.onnx", "--calibrator", calibrator) for n in (64, 512)}
    assert peaks[64] > 30, peaks  # a real measurement of the child (python + onnxruntime), not zero
    assert peaks[512] - peaks[64] < BOUND_MB, peaks


def test_memory_bound_catches_a_calculator_that_keeps_every_batch(conv_model: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    model, data = conv_model
    peaks = {n: _peak_mb(model, data, n, tmp_path / f"k{n}.onnx", "--calibrator", "test_keep_every_batch")
             for n in (64, 512)}
    assert peaks[512] - peaks[64] > BOUND_MB, peaks
