"""Core AI for real: prepared QDQ -> torch program (coreai::* ops) -> coreai-torch -> .aimodel, run by the Core AI
runtime on Linux and compared with onnxruntime on the prepared model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("coreai_torch")
pytest.importorskip("coreai.runtime")

import qdq
from qdq.backends import ExportBackend
from qdq.backends.artifact import BackendArtifact
from qdq.backends.coreai import CoreAIRuntime, inspect
from qdq.errors import BackendError, ConfigError, QdqError
from qdq.presets import preset
from qdq.qat.parity import code_parity, summarize, unexplained
from qdq.quantizer import Quantizer
from qdq.session import make_session

SEED = int(os.environ.get("QDQ_TEST_SEED", "0"))
PRESETS = ["int8", "w8", "w4", "fp8"]


def _w4_small_blocks() -> Any:
    """w4 with 8-wide blocks: the tiny models' layers are narrower than the preset's 32."""
    cfg = preset("w4").to_dict()
    cfg["global_config"]["op_state_spec"]["weight"]["granularity"] = {"type": "per_block", "block_size": 8}
    return cfg


def _config(name: str) -> Any:
    return _w4_small_blocks() if name == "w4" else preset(name)


@pytest.fixture(scope="module")
def cases(digits_onnx: Path, attention_onnx: Path, digits_data) -> dict[str, Any]:
    x_tr, _, x_te, _ = digits_data
    gen = torch.Generator().manual_seed(SEED)
    return {
        "digits": (digits_onnx, [x_tr[i:i + 64] for i in range(0, 256, 64)], x_te[:96]),
        "attention": (attention_onnx, [torch.randn(4, 8, 16, generator=gen).numpy() for _ in range(4)],
                      torch.randn(24, 8, 16, generator=gen).numpy()),
    }


def _calibrated(path: Path, config: Any, calib: list[np.ndarray]) -> Quantizer:
    q = Quantizer(path, config)
    prepared = q.prepare(calib[0])
    with q.calibration_mode():
        for batch in calib:
            prepared(batch)
    return q


@pytest.fixture(scope="module")
def finalized(cases: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """(model, preset) -> (quantizer, artifact, saved .aimodel path), converted once per module."""
    out: dict[tuple[str, str], Any] = {}
    folder = tmp_path_factory.mktemp("coreai")
    for name, (path, calib, _) in cases.items():
        for p in PRESETS:
            q = _calibrated(path, _config(p), calib)
            final = q.finalize(backend=ExportBackend.CoreAI)
            saved = qdq.save(final, folder / f"{name}_{p}.aimodel")
            out[name, p] = (q, final, saved)
    return out


def _weight_sites(final: BackendArtifact) -> list[Any]:
    return [i for i in final.module.infos.values() if i.kind in ("weight", "constant")]


@pytest.mark.parametrize("p", PRESETS)
@pytest.mark.parametrize("name", ["digits", "attention"])
def test_artifact_ops_and_storage(finalized, name: str, p: str) -> None:
    """Every quantized weight is one blockwise_shift_scale with integer/float8 data (no float copy); every
    activation pair is coreai quantize/dequantize; the asset holds no fake-quant and no float weight copy."""
    q, final, saved = finalized[name, p]
    info = inspect(saved)
    weights = _weight_sites(final)
    assert weights, "the preset quantizes weights"
    want = {"int8": "int8", "w8": "int8", "w4": "int4", "fp8": "float8_e4m3fn"}[p]
    assert info["weight_dtypes"] == {want: len(weights)}
    assert sorted(w["shape"] for w in info["weights"]) == sorted(tuple(w.shape) for w in weights)
    assert info["float_weights"] == []
    activations = [i for i in final.module.infos.values() if i.kind == "activation"]
    assert info["activation_pairs"] == len(activations) == info["ops"].get("dequantize", 0)
    if p in ("w8", "w4"):
        assert info["activation_pairs"] == 0
    # stored bytes: the quantized weights dominate; float32 storage is scales, biases, LayerNorm params
    n_weight = sum(int(np.prod(w.shape)) for w in weights)
    stored = {"int8": "Int8", "int4": "Int4", "float8_e4m3fn": "Float8E4M3FN"}[want]
    assert info["storage"].get(stored, 0) >= n_weight
    assert info["storage"].get("Float32", 0) < n_weight
    assert info["inputs"] == list(q.input_names) and info["outputs"] == list(q.output_names)
    # the lowered program reads no float weight: its state holds codes (and float biases / norms) only
    wide = (torch.float32, torch.float16, torch.bfloat16)
    float_state = [k for k, v in final.exported_program.state_dict.items() if v.dtype in wide and v.dim() >= 2
                   and "scale" not in k and "zero_point" not in k]
    assert not float_state, float_state


@pytest.mark.parametrize("p", PRESETS)
@pytest.mark.parametrize("name", ["digits", "attention"])
def test_program_and_runtime_match_onnxruntime(finalized, cases, name: str, p: str) -> None:
    """The torch program's integer codes equal onnxruntime's on the prepared model (≤ 1 step where float
    summation order decides), and the Core AI runtime on the .aimodel gives the program's outputs."""
    q, final, saved = finalized[name, p]
    _, _, x = cases[name]
    parity = code_parity(final.module, q.qdq_model(), x)  # free-running: each side from its own values
    assert not unexplained(parity), unexplained(parity)
    assert summarize(parity)[0] >= 0.999, summarize(parity)
    forced = code_parity(final.module, q.qdq_model(), x, teacher_forcing=True)  # one op's rounding at a time
    assert not unexplained(forced) and summarize(forced)[2] <= 1, summarize(forced)

    session = make_session(q.qdq_model(), level="none")
    ref = session.run(None, {session.get_inputs()[0].name: x})[0]
    eager = final.run(x)[0]
    with CoreAIRuntime(saved) as rt:
        got = rt.run(x)[0]
        again = rt.run({q.input_names[0]: x[:3]})[0]  # dynamic batch: another size, by name
    assert got.shape == ref.shape and again.shape == (3, *ref.shape[1:])
    close = np.isclose(got, eager, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(eager).max())))
    # float8 activations: a value on a rounding boundary may take the other step in one runtime (float summation
    # order differs between CPUs), which moves that sample's outputs; every other sample agrees
    per_sample = close.reshape(len(close), -1).all(axis=1)
    assert per_sample.mean() >= (0.97 if p == "fp8" else 1.0), (p, float(per_sample.mean()))
    np.testing.assert_allclose(again, got[:3], rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(got).max())))
    # against onnxruntime: outputs of a quantized output agree up to one step of its grid
    out_site = final.module.infos.get(next((k for k, i in final.module.infos.items()
                                            if i.tensor == q.output_names[0]), ""))
    tol = float(np.max(out_site.scale)) * 1.01 if out_site is not None and not out_site.dtype.is_float else None
    diff = np.abs(got - ref)
    if tol is not None:
        assert diff.max() <= tol and np.mean(diff <= 1e-5 + 1e-5 * np.abs(ref)) >= 0.99, (diff.max(), tol)
    else:  # weight-only or float8 output: float compute on identical dequantized weights
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.mean(diff <= 1e-3 * scale) >= 0.99, float(diff.max())


def test_finalize_returns_program_and_saves_atomically(finalized, tmp_path: Path) -> None:
    _q, final, _ = finalized["digits", "int8"]
    assert isinstance(final, BackendArtifact) and final.backend is ExportBackend.CoreAI
    assert isinstance(final.exported_program, torch.export.ExportedProgram)
    targets = {str(n.target) for n in final.exported_program.graph.nodes if n.op == "call_function"}
    assert {"coreai.quantize.default", "coreai.dequantize.default",
            "coreai.constexpr_blockwise_shift_scale.default"} <= targets
    assert not any("fake_quant" in t or "quantized_decomposed" in t for t in targets)
    # the first save and an overwrite both leave one complete asset and no temporary file behind
    path = tmp_path / "m.aimodel"
    final.save(path)
    first = sorted(p.name for p in path.iterdir())
    final.save(path)
    assert sorted(p.name for p in path.iterdir()) == first
    assert [p.name for p in tmp_path.iterdir()] == ["m.aimodel"]
    with pytest.raises(ConfigError, match=r"\*\.aimodel"):
        final.save(tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.aimodel"]
    # converting twice gives the same program: conversion does not consume the artifact
    assert final.convert() is not None and final.convert() is not None


def test_input_and_output_names(cases, tmp_path: Path) -> None:
    path, calib, x = cases["digits"]
    q = _calibrated(path, "int8", calib)
    final = q.finalize(ExportBackend.CoreAI, input_names=["image"], output_names="logits")
    saved = qdq.save(final, tmp_path / "named.aimodel")
    info = inspect(saved)
    assert info["inputs"] == ["image"] and info["outputs"] == ["logits"]
    with CoreAIRuntime(saved) as rt:
        assert rt.run({"image": x[:4]})[0].shape == (4, 10)
        with pytest.raises(QdqError, match="unknown input"):
            rt.run({"x": x[:4]})


def test_cli_writes_aimodel_and_refuses_bad_options(digits_onnx: Path, digits_data, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    from qdq.cli import main

    calib = tmp_path / "calib.npy"
    np.save(calib, digits_data[0][:128])
    out = tmp_path / "m.aimodel"
    code = main(["quantize", str(digits_onnx), "--calib-data", str(calib), "--backend", "coreai", "-o", str(out),
                 "--quiet"])
    assert code == 0 and out.is_dir()
    assert capfd.readouterr().out == ""  # --quiet: nothing from qdq or coreai-torch on stdout
    assert inspect(out)["weight_dtypes"] == {"int8": 4}
    bad = [
        (["--backend", "coreai", "-o", str(tmp_path / "m.onnx")], "*.aimodel"),
        (["--backend", "onnxruntime", "-o", str(tmp_path / "m.aimodel")], "*.onnx"),
        (["--backend", "coreml", "-o", str(tmp_path / "m.mlpackage"), "--deployment-target", "iOS16"],
         "deployment target"),
        (["--backend", "coreai", "-o", str(out), "--compute-precision", "float16"], "Core ML option"),
        (["-o", str(tmp_path / "m.onnx"), "--input-names", "a"], "Core ML / Core AI options"),
    ]
    for args, words in bad:
        code = main(["quantize", str(digits_onnx), "--calib-data", str(calib), *args])
        err = capfd.readouterr().err.strip().splitlines()
        assert code != 0 and err and words in err[-1], (args, err)
        assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "m.aimodel"]


def test_sub_byte_activations_refused_before_calibration(digits_onnx: Path) -> None:
    cfg = {"global_config": {"op_state_spec": {"weight": {"dtype": "int8"}}, "op_input_spec": {"*": {"dtype": "int4"}}}}
    with pytest.raises(BackendError, match="coreai does not support int4 activations: x"):
        qdq.quantize(digits_onnx, cfg, [np.zeros((2, 1, 8, 8), np.float32)], backend="coreai")


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from qdq.backends.coreai import _extra

    real = importlib.import_module

    def fake(name: str, *args: Any) -> Any:
        if name.startswith("coreai"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real(name, *args)

    monkeypatch.setattr(_extra.importlib, "import_module", fake)
    with pytest.raises(BackendError, match=r"pip install 'qdq\[coreai\]'") as err:
        _extra.require("coreai_torch")
    assert "\n" not in str(err.value)


def test_qat_export_reaches_the_lowering(digits_onnx: Path, digits_data, tmp_path: Path) -> None:
    """QATQuantizer.export(backend="coreai") writes the same kind of .aimodel as Quantizer.finalize, and the
    Core AI runtime on it gives the mirror's eval outputs."""
    from qdq.qat import QATQuantizer

    x_tr, _, x_te, _ = digits_data
    qat = QATQuantizer(digits_onnx, "int8")
    mirror = qat.prepare(x_tr[:64])
    with pytest.raises(ConfigError, match=r"saved as \*\.aimodel"):
        qat.export(tmp_path / "m.onnx", x_te[:4], backend="coreai")
    out = qat.export(tmp_path / "m.aimodel", x_te[:4], backend="coreai", output_names=["logits"])
    info = inspect(out)
    assert info["outputs"] == ["logits"] and info["weight_dtypes"] == {"int8": 4} and info["activation_pairs"] > 0
    mirror.eval()
    with torch.no_grad():
        want = mirror(torch.from_numpy(x_te[:32])).numpy()
    with CoreAIRuntime(out) as rt:
        got = rt.run(x_te[:32])[0]
    # the logits are float (float_graph_outputs): they differ by float summation order, and where that moves the
    # Gemm's input across a rounding boundary, by one step of its grid times the weights
    gemm_in = next(t for t in qat.plan.targets.values() if t.kind == "activation" and "node_linear" in t.ops)
    w = np.abs(qat._quantizer.float_model.graph.initializers["fc.weight"].const_value.numpy()).sum(axis=1).max()
    step = float(np.max(qat.qparams[gemm_in.key].scale)) * float(w)
    assert np.abs(got - want).max() <= 1.01 * step and np.mean(np.abs(got - want) <= 1e-4) >= 0.95


class _Upsampler(torch.nn.Module):
    """A decoder step: nearest x2 and bilinear x2 upsampling (torch exports both as Resize) between convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")
        y = self.b(y)
        return torch.nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)


def test_resize_lowers_and_runs_like_onnxruntime(tmp_path: Path) -> None:
    """Resize (nearest asymmetric/floor and bilinear half-pixel, as torch exports them) goes through the mirror
    to a Core AI program whose runtime output matches the prepared model in onnxruntime."""
    from qdq.torch_export import export

    torch.manual_seed(SEED)
    x = torch.randn(16, 3, 8, 8)
    path = export(_Upsampler().eval(), (x[:2],), tmp_path / "up.onnx")
    q = _calibrated(path, "int8", [x.numpy()])
    saved = qdq.save(q.finalize(backend=ExportBackend.CoreAI), tmp_path / "up.aimodel")
    session = make_session(q.qdq_model(), level="none")
    ref = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with CoreAIRuntime(saved) as rt:
        got = rt.run(x.numpy())[0]
    assert got.shape == ref.shape == (16, 4, 32, 32)
    step = float(np.abs(ref).max()) / 127  # about one step of the quantized output
    assert np.mean(np.abs(got - ref) <= 1.01 * step) >= 0.99, float(np.abs(got - ref).max())


def test_op_without_torch_implementation_refused_before_calibration() -> None:
    """Core ML / Core AI lower through the mirror's op table: a CumSum is named (with the fix) at planning time."""
    from onnx import TensorProto, helper, numpy_helper

    from qdq.backends.artifact import check_backend_plan

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("CumSum", ["c", "axis"], ["y"], name="running_total")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
         numpy_helper.from_array(np.array(3, np.int64), "axis")])
    q = Quantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "int8")
    for backend in (ExportBackend.CoreAI, ExportBackend.CoreML):
        with pytest.raises(BackendError, match=r"no torch implementation of CumSum \('running_total'\).*onnxruntime"):
            check_backend_plan(q.plan, backend, model=q.float_model)
    check_backend_plan(q.plan, ExportBackend.ONNXRuntime, model=q.float_model)  # onnxruntime runs any op


def test_op_attribute_the_mirror_does_not_run_refused_before_calibration() -> None:
    """Compile-time refusals come at planning too: a half-pixel nearest Resize (torch never exports it) is named."""
    from onnx import TensorProto, helper, numpy_helper

    from qdq.backends.artifact import check_backend_plan

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Resize", ["c", "", "s"], ["y"], mode="nearest", name="up")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 12, 12])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
         numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")])
    q = Quantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "int8")
    with pytest.raises(BackendError, match=r"coreai lowering: Resize 'up' \(mode nearest, coordinate_transformation_mode "
                                           r"half_pixel.*onnxruntime"):
        check_backend_plan(q.plan, ExportBackend.CoreAI, model=q.float_model)
