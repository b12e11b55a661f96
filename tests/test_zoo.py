"""The zoo through the CLI: every model quantizes with the int8 presets, passes the full checker, runs in
onnxruntime and stays close to FP32 (per-output SQNR floors), and integer inputs are never quantized.

Exports, data and quantized models are cached per test session (one export per model, one CLI run per
model and preset). SQNR floors are the values measured with ``scripts/bench_zoo.py``'s data (64
calibration / 64 held-out samples) minus 6 dB, rounded down: a placement or calibration regression
costs far more than that (a symmetric grid after HardSwish: ~3 dB; a quantized attention mask: all).
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from models.zoo import ZOO
from models.zoo.evaluate import run_onnx, sqnr_db
from models.zoo.sequence import bert_data
from qdq.cli import main

PRESETS = ("int8", "int8-global-minmax")
N_CALIB, N_EVAL = 64, 64

#: (model, preset) -> {output: minimum SQNR dB}: measured (bench_zoo data) minus 6 dB.
FLOORS: dict[tuple[str, str], dict[str, float]] = {
    ("static_cnn", "int8"): {"logits": 34.0}, ("static_cnn", "int8-global-minmax"): {"logits": 34.0},
    ("resnet", "int8"): {"logits": 36.0}, ("resnet", "int8-global-minmax"): {"logits": 36.0},
    ("mobilenetv3", "int8"): {"logits": 21.0}, ("mobilenetv3", "int8-global-minmax"): {"logits": 21.0},
    ("grouped", "int8"): {"logits": 35.0}, ("grouped", "int8-global-minmax"): {"logits": 35.0},
    ("unet", "int8"): {"mask": 25.0}, ("unet", "int8-global-minmax"): {"mask": 23.0},
    ("fp16", "int8"): {"logits": 31.0}, ("fp16", "int8-global-minmax"): {"logits": 36.0},
    ("opset11", "int8"): {"logits": 28.0}, ("opset11", "int8-global-minmax"): {"logits": 29.0},
    ("two_io", "int8"): {"logits": 17.0, "regression": 16.0},
    ("two_io", "int8-global-minmax"): {"logits": 26.0, "regression": 20.0},
    ("vit", "int8"): {"logits": 8.0}, ("vit", "int8-global-minmax"): {"logits": 11.0},
    ("bert", "int8"): {"pooled": 28.0}, ("bert", "int8-global-minmax"): {"pooled": 28.0},
    ("gru", "int8"): {"logits": 32.0}, ("gru", "int8-global-minmax"): {"logits": 34.0},
}

_INTEGER = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL, onnx.TensorProto.INT8,
            onnx.TensorProto.UINT8, onnx.TensorProto.INT16}


class _Zoo:
    """Session cache: exported FP32 files, calibration .npz, evaluation data, FP32 outputs, quantized files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.models: dict[str, dict[str, Any]] = {}
        self.quantized: dict[tuple[str, str], tuple[int, str, Path]] = {}

    def model(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            zoo = ZOO[name]
            path = zoo.export(self.folder / f"{name}.onnx")
            calib = self.folder / f"{name}.calib.npz"
            np.savez(calib, **zoo.data(N_CALIB, 0))
            evaluation = zoo.data(N_EVAL, 1)
            self.models[name] = {"path": path, "calib": calib, "eval": evaluation,
                                 "ref": run_onnx(path, evaluation)}
        return self.models[name]

    def quantize(self, name: str, preset: str) -> tuple[int, str, Path]:
        """(exit code, stderr, output path) of ``qdq quantize`` with default options."""
        key = (name, preset)
        if key not in self.quantized:
            m = self.model(name)
            out = self.folder / f"{name}.{preset}.onnx"
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(["--quiet", "quantize", str(m["path"]), "-o", str(out), "--calib-data", str(m["calib"]),
                           "--preset", preset])
            self.quantized[key] = (rc, err.getvalue().strip(), out)
        return self.quantized[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> _Zoo:
    return _Zoo(tmp_path_factory.mktemp("zoo"))


def _quantized_ok(zoo: _Zoo, name: str, preset: str) -> Path:
    rc, err, out = zoo.quantize(name, preset)
    assert rc == 0, f"{name} --preset {preset}: {err}"
    return out


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def test_zoo_has_every_required_architecture() -> None:
    required = {"static_cnn", "resnet", "mobilenetv3", "vit", "bert", "unet", "grouped", "gru", "two_io", "fp16",
                "opset11"}
    assert required <= set(ZOO)
    assert set(FLOORS) == {(n, p) for n in ZOO for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_quantizes_checks_runs_and_is_close(zoo: _Zoo, name: str, preset: str) -> None:
    out = _quantized_ok(zoo, name, preset)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    m = zoo.model(name)
    quant = run_onnx(out, m["eval"])
    assert set(quant) == set(m["ref"])
    for key, ref in m["ref"].items():
        assert quant[key].dtype == ref.dtype and quant[key].shape == ref.shape
        floor = FLOORS[(name, preset)][key]
        assert sqnr_db(ref, quant[key]) >= floor, f"{name} {preset} output {key}: SQNR below {floor} dB"
    n_q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert n_q > 0, "nothing was quantized"


@pytest.mark.parametrize("name", [n for n in ZOO if ZOO[n].integer_inputs] + ["static_cnn"])
def test_integer_inputs_never_get_qdq(zoo: _Zoo, name: str) -> None:
    proto = onnx.load(_quantized_ok(zoo, name, "int8"))
    types = _dtypes(proto)
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            assert types.get(node.input[0]) not in _INTEGER, f"{node.name} quantizes integer tensor {node.input[0]}"
    declared = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    for name_ in ZOO[name].integer_inputs:
        assert declared[name_] == onnx.TensorProto.INT64


def test_model_interface_is_kept(zoo: _Zoo) -> None:
    """Static batch, float16 and dynamic-sequence interfaces survive quantization unchanged."""
    for name in ("static_cnn", "fp16", "bert"):
        fp32 = onnx.load(zoo.model(name)["path"])
        quant = onnx.load(_quantized_ok(zoo, name, "int8"))
        for a, b in zip(fp32.graph.input, quant.graph.input, strict=True):
            assert (a.name, a.type) == (b.name, b.type)
        for a, b in zip(fp32.graph.output, quant.graph.output, strict=True):
            assert a.name == b.name and a.type.tensor_type.elem_type == b.type.tensor_type.elem_type
    static = onnx.load(zoo.model("static_cnn")["path"]).graph.input[0].type.tensor_type.shape.dim[0]
    assert static.dim_value == 1
    assert onnx.load(zoo.model("fp16")["path"]).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_bert_runs_at_another_sequence_length(zoo: _Zoo) -> None:
    """The sequence dim stays dynamic: calibrated at 16 tokens, the quantized model runs (and is close) at 40."""
    m = zoo.model("bert")
    data = bert_data(32, 2, seq=40)
    ref, quant = run_onnx(m["path"], data), run_onnx(_quantized_ok(zoo, "bert", "int8"), data)
    assert sqnr_db(ref["pooled"], quant["pooled"]) >= FLOORS[("bert", "int8")]["pooled"] - 3.0


def test_attention_mask_arithmetic_stays_float(zoo: _Zoo) -> None:
    """``(1 - mask) * finfo.min`` and the Add applying it get no QDQ: every activation scale stays small."""
    from onnx import numpy_helper

    proto = onnx.load(_quantized_ok(zoo, "bert", "int8"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scales = [float(np.max(inits[n.input[1]])) for n in proto.graph.node
              if n.op_type == "QuantizeLinear" and n.input[1] in inits]
    assert scales and max(scales) < 1.0 and all(math.isfinite(s) for s in scales)


def test_one_sided_activations_are_asymmetric(zoo: _Zoo) -> None:
    """After HardSwish (mobilenetv3) and Gelu / Softmax (vit) the uint8 zero point sits near the bottom."""
    from onnx import numpy_helper

    for name, ops in (("mobilenetv3", {"HardSwish"}), ("vit", {"Gelu", "Softmax"})):
        proto = onnx.load(_quantized_ok(zoo, name, "int8-global-minmax"))
        producer = {o: n for n in proto.graph.node for o in n.output}
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        zps = []
        for node in proto.graph.node:
            src = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
            if src is not None and src.op_type in ops:
                zps.append(int(inits[node.input[2]]))
        assert zps, f"{name}: no QuantizeLinear after {ops}"
        assert all(zp < 100 for zp in zps), f"{name}: zero points {zps} (128 = symmetric)"
