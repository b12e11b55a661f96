"""Inputs as the model declares them: int64 ids and masks, float16, several inputs/outputs, static batches,
optional inputs, and one-line mismatch errors raised before any calibration session exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq
from qdq import DataError, Quantizer
from qdq.data import open_data
from qdq.model_inputs import InputSpec, ModelInputs, model_inputs
from qdq.session import make_session
from qdq.validate import run_model

RNG = np.random.default_rng(0)
VOCAB, DIM = 50, 8


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return path


def encoder(batch: int | str = "N") -> onnx.ModelProto:
    """input_ids/attention_mask (int64 [batch, S]) -> embedding, projection, ReLU, masked mean pooling [batch, D]."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32), "emb"),
             numpy_helper.from_array((rng.standard_normal((DIM, DIM)) * 0.4).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(DIM).astype(np.float32), "B"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"), numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["mm"], name="proj"),
             helper.make_node("Add", ["mm", "B"], ["pa"], name="proj_bias"),
             helper.make_node("Relu", ["pa"], ["h"], name="act"),
             helper.make_node("Cast", ["attention_mask"], ["mf"], name="mask_float", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "ax2"], ["m3"], name="mask3"),
             helper.make_node("Mul", ["h", "m3"], ["hm"], name="masked"),
             helper.make_node("ReduceSum", ["hm", "ax1"], ["s"], name="sum_tokens", keepdims=0),
             helper.make_node("ReduceSum", ["m3", "ax1"], ["n"], name="count_tokens", keepdims=0),
             helper.make_node("Div", ["s", "n"], ["pooled"], name="mean_pool")]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, [batch, "S"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "enc", ints, [helper.make_tensor_value_info("pooled", TensorProto.FLOAT,
                                                                                [batch, DIM])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def tokens(n: int, seq: int, dtype: type = np.int64) -> dict[str, np.ndarray]:
    ids = RNG.integers(0, VOCAB, size=(n, seq)).astype(dtype)
    mask = np.ones((n, seq), dtype)
    for i in range(n):
        mask[i, RNG.integers(1, seq + 1):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def two_in_two_out(batch: int | str = "N") -> onnx.ModelProto:
    """a [batch, 4], b [batch, 3] -> y1 = Relu(a W1) [batch, 5], y2 = a W2 + b W3 [batch, 2]."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (4, 5)), ("W2", (4, 2)), ("W3", (3, 2)))]
    nodes = [helper.make_node("MatMul", ["a", "W1"], ["m1"], name="mm1"),
             helper.make_node("Relu", ["m1"], ["y1"], name="relu"),
             helper.make_node("MatMul", ["a", "W2"], ["m2"], name="mm2"),
             helper.make_node("MatMul", ["b", "W3"], ["m3"], name="mm3"),
             helper.make_node("Add", ["m2", "m3"], ["y2"], name="add")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, 4]),
                                             helper.make_tensor_value_info("b", TensorProto.FLOAT, [batch, 3])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [batch, 5]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [batch, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def fp16_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.5).astype(np.float16), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "B")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "B"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "f16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def with_default_input() -> onnx.ModelProto:
    """y = x + offset, where graph input ``offset`` has an initializer (a default value): optional."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "offset"], ["s"], name="add"),
                               helper.make_node("Relu", ["s"], ["y"], name="relu")], "opt",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("offset", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32), "offset")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


# ----------------------------------------------------------------------------- signatures and feeds


def test_signature_reads_dtypes_shapes_and_defaults() -> None:
    sig = model_inputs(encoder(1))
    assert [(s.name, s.dtype, s.shape) for s in sig] == [("input_ids", np.int64, (1, "S")),
                                                          ("attention_mask", np.int64, (1, "S"))]
    assert sig.static_batch == 1 and {s.kind for s in sig} == {"int"}
    f16 = model_inputs(fp16_mlp())
    assert f16[0].dtype == np.float16 and f16.static_batch is None
    opt = model_inputs(with_default_input())
    assert opt.required_names == ["x"] and opt.by_name["offset"].optional


def test_feeds_are_converted_losslessly_or_refused() -> None:
    sig = model_inputs(encoder())
    toks = tokens(3, 5, np.int32)
    feeds = sig.feeds(toks)
    assert all(v.dtype == np.int64 for v in feeds.values())
    np.testing.assert_array_equal(feeds["input_ids"], toks["input_ids"])
    as_float = sig.feeds({k: v.astype(np.float32) for k, v in toks.items()})  # integral floats are fine
    np.testing.assert_array_equal(as_float["input_ids"], toks["input_ids"])
    bad = {**toks, "input_ids": toks["input_ids"] + 0.5}
    with pytest.raises(DataError, match=r"input 'input_ids' expects integers \(int64 \(N, S\)\) but got float64"):
        sig.feeds(bad)
    torch = pytest.importorskip("torch")
    from_torch = sig.feeds((torch.from_numpy(toks["input_ids"]), torch.from_numpy(toks["attention_mask"])))
    np.testing.assert_array_equal(from_torch["attention_mask"], toks["attention_mask"])
    f16 = model_inputs(fp16_mlp()).feeds(np.ones((2, 8)))
    assert f16["x"].dtype == np.float16


@pytest.mark.parametrize(("batch", "message"), [
    ({"input_ids": np.zeros((2, 4), np.int64)},
     (r"has no array for model input 'attention_mask' \(int64 \(N, S\)\).*data has inputs \(input_ids\) but the "
     r"model expects \(input_ids, attention_mask\)")),
    ({**tokens(2, 4), "token_type_ids": np.zeros((2, 4), np.int64)}, r"has 'token_type_ids', which is not a model input"),
    ({**tokens(2, 4), "input_ids": np.zeros((2, 4, 1), np.int64)},
     r"input 'input_ids' got 3 dims \(2, 4, 1\) but the model expects 2 \(N, S\)"),
    ({**tokens(2, 4), "input_ids": np.array([["a"] * 4] * 2)}, r"input 'input_ids' got <U1 data but the model expects"),
    ({**tokens(2, 4), "attention_mask": np.full((2, 4), 0.25, np.float32)}, r"input 'attention_mask' expects integers"),
])
def test_mismatches_are_one_line_before_any_calibration_session(monkeypatch, batch, message: str) -> None:
    from qdq.calibration import runner

    def no_session(*args, **kwargs):
        raise AssertionError("the calibration session was built before the data was checked")

    monkeypatch.setattr(runner, "make_session", no_session)
    q = Quantizer(encoder(), "int8")
    with pytest.raises(DataError, match=message) as info:
        q.calibrate([batch], progress=False)
    assert "\n" not in str(info.value)


def test_static_dim_and_rank_mismatch_name_the_input(monkeypatch) -> None:
    from qdq.calibration import runner

    monkeypatch.setattr(runner, "make_session", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    q = Quantizer(two_in_two_out(2), "int8")
    with pytest.raises(DataError, match=r"input 'b' got shape \(5, 4\) but the model expects float32 \(2, 3\) "
                                        r"\(dim 1 must be 3\)"):
        q.calibrate([{"a": np.zeros((5, 4), np.float32), "b": np.zeros((5, 4), np.float32)}], progress=False)
    with pytest.raises(DataError, match=r"has 1 arrays but the model takes 2 inputs \(a, b\)"):
        q.calibrate([np.zeros((5, 4), np.float32)], progress=False)


def test_data_files_are_checked_against_the_model_when_opened(tmp_path: Path) -> None:
    sig = model_inputs(two_in_two_out(2))
    np.savez(tmp_path / "rank.npz", a=np.zeros((6, 4, 1), np.float32), b=np.zeros((6, 3), np.float32))
    with pytest.raises(DataError, match=r"input 'a' has 3 dims \(6, 4, 1\) but the model input has 2 \(2, 4\)"):
        open_data(tmp_path / "rank.npz", sig)
    np.savez(tmp_path / "dim.npz", a=np.zeros((6, 4), np.float32), b=np.zeros((6, 5), np.float32))
    with pytest.raises(DataError, match=r"input 'b' got shape \(6, 5\) but the model expects float32 \(2, 3\)"):
        open_data(tmp_path / "dim.npz", sig)
    np.savez(tmp_path / "names.npz", a=np.zeros((6, 4), np.float32))
    with pytest.raises(DataError, match=r"no array for model input\(s\) b"):
        open_data(tmp_path / "names.npz", sig)
    np.savez(tmp_path / "ok.npz", a=np.zeros((7, 4), np.float64), b=np.ones((7, 3), np.int32))
    src = open_data(tmp_path / "ok.npz", sig)  # any sample count: a static batch runs in chunks
    (first, *_) = src.batches(4)
    assert first["a"].dtype == np.float32 and first["b"].dtype == np.float32
    enc = model_inputs(encoder())
    np.savez(tmp_path / "tok.npz", **tokens(5, 6, np.int32))
    batch = next(open_data(tmp_path / "tok.npz", enc).batches(8))
    assert batch["input_ids"].dtype == np.int64 and batch["input_ids"].shape == (5, 6)


# ----------------------------------------------------------------------------- models end to end


@pytest.mark.parametrize("batch", ["N", 1])
def test_int64_encoder_quantizes_runs_and_compares(tmp_path: Path, batch: int | str) -> None:
    fp32 = _save(encoder(batch), tmp_path / "enc.onnx")
    np.savez(tmp_path / "tok.npz", **tokens(13, 7))
    final = qdq.quantize(fp32, "int8", tmp_path / "tok.npz", batch_size=4, progress=False)
    ints = {"input_ids", "attention_mask"}
    assert not [n for n in final.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name in ints]
    assert any(n.op_type == "QuantizeLinear" for n in final.graph)  # activations were quantized
    qdq.save(final, tmp_path / "enc_q.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "enc_q.onnx"), full_check=True)
    (out,) = run_model(tmp_path / "enc_q.onnx", [tokens(3, 9)])  # a static batch of 1 runs sample by sample
    assert out["pooled"].shape == (3, DIM) and np.isfinite(out["pooled"]).all()
    report = qdq.compare(fp32, tmp_path / "enc_q.onnx", tmp_path / "tok.npz", progress=False)
    (o,) = report.outputs
    assert report.num_samples == 13 and o.name == "pooled"
    assert o.top1_agreement is None  # a pooled embedding (Div), not class scores
    assert o.cosine is not None and 0.9 < o.cosine <= 1.0 and o.sqnr_db > 10
    assert "cosine" in report.format()
    # int32 ids give exactly the qparams of int64 ids (the conversion is lossless)
    q64, q32 = Quantizer(fp32, "int8"), Quantizer(fp32, "int8")
    toks = tokens(8, 5)
    q64.calibrate([toks], progress=False)
    q32.calibrate([{k: v.astype(np.int32) for k, v in toks.items()}], progress=False)
    assert {k: float(v.scale) for k, v in q64.qparams.items() if v.scale.ndim == 0} == \
        {k: float(v.scale) for k, v in q32.qparams.items() if v.scale.ndim == 0}


def test_float16_model_is_fed_float16(tmp_path: Path) -> None:
    x = RNG.standard_normal((20, 8))  # float64 data: fed as the model's float16
    q = Quantizer(fp16_mlp(), "int8-global-minmax")
    prepared = q.prepare()
    with q.calibration_mode():
        out = prepared(x)
    assert out.dtype == np.float16 and out.shape == (20, 4)
    ref = Quantizer(fp16_mlp(), "int8-global-minmax")
    ref.calibrate([x.astype(np.float16)], progress=False)
    assert {k: float(v.scale.max()) for k, v in q.qparams.items()} == \
        {k: float(v.scale.max()) for k, v in ref.qparams.items()}
    assert prepared(x[:3]).dtype == np.float16
    final = q.finalize("onnxruntime")
    report = qdq.compare(fp16_mlp(), final, [x[:10], x[10:]], progress=False)
    assert report.num_samples == 20 and report.outputs[0].sqnr_db > 10


def test_two_inputs_two_outputs_static_batch_with_padding(tmp_path: Path) -> None:
    a, b = RNG.standard_normal((7, 4)).astype(np.float32), RNG.standard_normal((7, 3)).astype(np.float32)
    np.savez(tmp_path / "ab.npz", a=a, b=b)
    static = _save(two_in_two_out(2), tmp_path / "two2.onnx")
    dynamic = _save(two_in_two_out("N"), tmp_path / "twoN.onnx")
    fin_static = qdq.quantize(static, "int8-global-minmax", tmp_path / "ab.npz", batch_size=3, progress=False)
    fin_dynamic = qdq.quantize(dynamic, "int8-global-minmax", tmp_path / "ab.npz", batch_size=3, progress=False)

    def scales(m):
        return sorted(float(np.asarray(n.inputs[1].const_value.numpy()).max()) for n in m.graph
                      if n.op_type == "QuantizeLinear")

    assert scales(fin_static) == scales(fin_dynamic)
    q = Quantizer(static, "int8-global-minmax")
    prepared = q.prepare()
    with q.calibration_mode():
        y1, y2 = prepared(a[:3], b[:3])  # 3 samples on a batch-2 model: padded run, copies dropped
    assert y1.shape == (3, 5) and y2.shape == (3, 2)
    fp = make_session(dynamic).run(None, {"a": a[:3], "b": b[:3]})
    np.testing.assert_allclose(y1, fp[0], rtol=1e-6)
    np.testing.assert_allclose(y2, fp[1], rtol=1e-6, atol=1e-6)
    out1, out2 = prepared({"a": a, "b": b})  # fake-quantized run, 7 samples in runs of 2
    assert out1.shape == (7, 5) and out2.shape == (7, 2)
    qdq.save(fin_static, tmp_path / "two2_q.onnx")
    report = qdq.compare(static, tmp_path / "two2_q.onnx", tmp_path / "ab.npz", batch_size=5, progress=False)
    assert report.num_samples == 7 and [o.name for o in report.outputs] == ["y1", "y2"]
    assert all(o.cosine is not None and o.cosine > 0.9 for o in report.outputs)
    assert report.outputs[0].top1_agreement is not None


def test_optional_inputs_may_be_absent() -> None:
    x = RNG.standard_normal((6, 3)).astype(np.float32)
    q = Quantizer(with_default_input(), "int8-global-minmax")
    q.calibrate([{"x": x}], progress=False)
    out = q.prepared(x) if q.prepared is not None else None
    assert out is not None and out.shape == (6, 3)
    given = q.prepared({"x": x, "offset": np.zeros(3, np.float32)})
    assert not np.allclose(given, out)  # the default was replaced


def test_bfloat16_input_is_fed_as_bfloat16() -> None:
    """onnxruntime's numpy bridge has no bfloat16: qdq passes ml_dtypes arrays as OrtValues."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = numpy_helper.from_array((RNG.standard_normal((8, 4)) * 0.5).astype(np.float32), "W")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["xf", "W"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"])]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert model_inputs(model)[0].dtype == ml_dtypes.bfloat16
    x = RNG.standard_normal((16, 8)).astype(np.float32)
    q = Quantizer(model, "int8-global-minmax")
    q.calibrate([x], progress=False)
    xf = x.astype(ml_dtypes.bfloat16).astype(np.float32)  # what the model sees after its Cast
    lo, hi = float(q._calculators["xf"].min_val), float(q._calculators["xf"].max_val)
    assert (lo, hi) == (float(xf.min()), float(xf.max()))
    assert q.prepared is not None and q.prepared(x[:3]).shape == (3, 4)


def _with_temperature() -> onnx.ModelProto:
    """y = (x @ W) / temp with a rank-0 float input ``temp``: one value for the whole run."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (16, 8)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Div", ["h", "temp"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                                    helper.make_tensor_value_info("temp", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_rank0_input_takes_one_value_for_every_batch(tmp_path: Path, save) -> None:
    """A scalar model input: a 0-d value in the data file (mapped or compressed) goes with every batch, in memory a
    0-d array stays 0-d, and a per-sample array gets one line saying what to save."""
    model = _save(_with_temperature(), tmp_path / "temp.onnx")
    x = np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32)
    save(tmp_path / "calib.npz", x=x, temp=np.float32(2.5))
    source = open_data(tmp_path / "calib.npz", model_inputs(onnx.load(model)))
    assert len(source) == 10
    batches = list(source.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["temp"].shape == () and b["temp"] == np.float32(2.5) for b in batches)
    out = tmp_path / "q.onnx"
    qdq.quantize(model, "int8", tmp_path / "calib.npz", output=out, progress=False)
    report = qdq.compare(model, out, tmp_path / "calib.npz", progress=False, batch_size=3)
    assert report.num_samples == 10 and report.outputs[0].sqnr_db > 30
    assert model_inputs(onnx.load(model)).feeds({"x": x, "temp": np.float32(2.5)})["temp"].shape == ()
    save(tmp_path / "per_sample.npz", x=x, temp=np.full(10, 2.5, np.float32))  # one copy per sample: all the same
    assert all(b["temp"].shape == () for b in open_data(tmp_path / "per_sample.npz",
                                                          model_inputs(onnx.load(model))).batches(4))
    save(tmp_path / "matrix.npz", x=x, temp=np.full((10, 2), 2.5, np.float32))
    with pytest.raises(DataError, match=r"'temp' is a scalar \(rank 0\).*has \(10, 2\); save one 0-d value"):
        open_data(tmp_path / "matrix.npz", model_inputs(onnx.load(model)))


def test_rank0_input_with_different_values_in_one_batch_is_refused(tmp_path: Path) -> None:
    model = onnx.load(_save(_with_temperature(), tmp_path / "temp.onnx"))
    folder = tmp_path / "data"
    folder.mkdir()
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.savez(folder / "a.npz", x=x, temp=np.float32(2.0))
    np.savez(folder / "b.npz", x=x, temp=np.float32(100.0))
    source = open_data(folder, model_inputs(model))
    assert [b["temp"] for b in source.batches(3)] == [2.0, 100.0]  # a batch per file: each its own value
    with pytest.raises(DataError, match=r"scalar input 'temp' has different values in the data files of one batch"):
        list(source.batches(4))


def _with_pads(batch: int | str) -> onnx.ModelProto:
    """y = Pad(Conv(x), pads) with ``pads`` a fixed (8,) int64 input: no batch axis, beside images (batch, 3, 6, 6)."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"]),
                               helper.make_node("Pad", ["c", "pads"], ["y"], mode="constant")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6]),
                                    helper.make_tensor_value_info("pads", TensorProto.INT64, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, "H", "W"])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_unbatched_input_rule() -> None:
    """Which inputs have no sample axis: scalars; fixed-shape inputs beside a dynamic batch; beside a fixed batch,
    those whose first dim is not the highest-rank input's."""
    def spec(name: str, *shape: Any) -> InputSpec:
        return InputSpec(name, ir.DataType.FLOAT, tuple(shape))

    assert ModelInputs([spec("x", "N", 3), spec("pads", 8), spec("t")]).unbatched == {"pads", "t"}
    static = ModelInputs([spec("x", 1, 3, 6, 6), spec("pads", 8), spec("m", 1, 6)])
    assert static.unbatched == {"pads"} and static.static_batch == 1
    film = ModelInputs([spec("x", 1, 4, 8, 8), spec("gamma", 4, 1, 1), spec("beta", 4, 1, 1)])  # the data comes first
    assert film.unbatched == {"gamma", "beta"} and film.static_batch == 1
    norm = ModelInputs([spec("X", 2, 3, 4, 5), spec("scale", 3), spec("B", 3), spec("mean", 3), spec("var", 3)])
    assert norm.unbatched == {"scale", "B", "mean", "var"} and norm.static_batch == 2
    assert ModelInputs([spec("a", 2, 3), spec("b", 2, 5)]).unbatched == set()
    cache = ModelInputs([spec("input_ids", 1, 8), spec("past", 4, 1, 8, 16)])  # a layers-first cache: batch 1
    assert cache.unbatched == {"past"} and cache.static_batch == 1
    hf = ModelInputs([spec("input_ids", "N", "S"), spec("position_ids", 1, "S")])  # a broadcast (1, S) row
    assert hf.unbatched == {"position_ids"} and hf.static_batch is None
    empty_axes = ModelInputs([spec("axes", 0), spec("data", 3, 2, 2)])  # a zero-size input is fixed, never the batch
    assert empty_axes.unbatched == {"axes"} and empty_axes.static_batch == 3
    assert ModelInputs([spec("ids", "N", "S"), spec("mask", "N", "S")]).unbatched == set()


@pytest.mark.parametrize("batch", ["N", 1])
def test_input_without_batch_axis_is_fed_whole(tmp_path: Path, batch: int | str) -> None:
    """A fixed (8,) ``pads`` input beside images: its one value (or one copy per sample) goes with every run, for a
    dynamic and a batch-1 model; quantize and compare run; samples that disagree in one batch get one line."""
    model = _save(_with_pads(batch), tmp_path / "pads.onnx")
    signature = model_inputs(onnx.load(model))
    assert signature.unbatched == {"pads"}
    x = np.random.default_rng(1).standard_normal((10, 3, 6, 6)).astype(np.float32)
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    np.savez(tmp_path / "one.npz", x=x, pads=pads)
    np.savez_compressed(tmp_path / "each.npz", x=x, pads=np.tile(pads, (10, 1)))
    for name in ("one.npz", "each.npz"):
        batches = list(open_data(tmp_path / name, signature).batches(4))
        assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
        assert all(np.array_equal(b["pads"], pads) for b in batches)
    out = tmp_path / "q.onnx"
    qdq.quantize(model, "int8", tmp_path / "each.npz", output=out, progress=False, batch_size=4)
    report = qdq.compare(model, out, tmp_path / "one.npz", progress=False, batch_size=3)
    assert report.num_samples == 10 and report.outputs[0].sqnr_db > 30
    assert signature.feeds({"x": x, "pads": pads})["pads"].shape == (8,)
    with pytest.raises(DataError, match=r"'pads' has no batch axis \(model shape \(8\)\).*got \(10, 8\)"):
        signature.feeds({"x": x, "pads": np.tile(pads, (10, 1))})
    mixed = np.tile(pads, (10, 1))
    mixed[6] = 0
    np.savez(tmp_path / "mixed.npz", x=x, pads=mixed)
    assert len(list(open_data(tmp_path / "mixed.npz", signature).batches(1))) == 10
    with pytest.raises(DataError, match=r"mixed.npz: input 'pads' has no batch axis.*samples 4..7 differ"):
        list(open_data(tmp_path / "mixed.npz", signature).batches(4))


def _vector_model() -> onnx.ModelProto:
    """y = Relu(x @ W1) @ W2 for a fixed (16,) input: no batch axis (a torch model exported on a 1-D example)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (32, 4)).astype(np.float32), "W2")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                               helper.make_node("MatMul", ["r", "W2"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_a_model_without_batch_axis_takes_whole_inputs(tmp_path: Path) -> None:
    """A fixed (16,) input: a file of whole inputs (samples, 16) runs each sample alone and counts samples; a single
    (16,) vector gives the same metrics whatever the batch size (its rows used to be cut by --batch-size and padded
    with copies: 39.8 dB at batch 16, 26.4 dB at batch 4, a 5.7 dB model)."""
    model = _save(_vector_model(), tmp_path / "vec.onnx")
    xs = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    np.save(tmp_path / "many.npy", xs)
    np.save(tmp_path / "one.npy", xs[0])
    source = open_data(tmp_path / "many.npy", model_inputs(onnx.load(model)))
    assert len(source) == 8 and source.rows_per_sample == 16
    assert [b["x"].shape for b in source.batches(3)] == [(48,), (48,), (32,)]
    for batch_size in (3, 8):
        out = tmp_path / f"q{batch_size}.onnx"
        qdq.quantize(model, "int8", tmp_path / "many.npy", output=out, progress=False, batch_size=batch_size)
        report = qdq.compare(model, out, tmp_path / "many.npy", progress=False, batch_size=batch_size)
        assert report.num_samples == 8 and report.outputs[0].sqnr_db > 30
    assert qdq.compare(model, out, open_data(tmp_path / "many.npy", model_inputs(onnx.load(model)), num_samples=5),
                       progress=False).num_samples == 5
    single = [qdq.compare(model, out, tmp_path / "one.npy", progress=False, batch_size=b).outputs[0].sqnr_db
              for b in (16, 5, 4)]
    assert single[0] == single[1] == single[2]
    labels = np.arange(8 * 16) % 4  # whole inputs: a label per row of the model's first dim
    assert qdq.compare(model, out, tmp_path / "many.npy", labels=labels, progress=False).num_samples == 8
    with pytest.raises(DataError, match=r"8 labels but 128 rows \(8 whole inputs of 16\)"):
        qdq.compare(model, out, open_data(tmp_path / "many.npy", model_inputs(onnx.load(model))), labels=labels[:8],
                    progress=False)


def test_position_ids_row_beside_a_dynamic_batch(tmp_path: Path) -> None:
    """Hugging Face layout: input_ids (N, S) and position_ids (1, S). position_ids is saved once (1, S) or as a row per
    sample (samples, S); both quantize and compare alike (neither could be fed before)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (50, 16)).astype(np.float32), "tok"),
             numpy_helper.from_array(rng.normal(0, 1, (12, 16)).astype(np.float32), "pos"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "W")]
    graph = helper.make_graph([helper.make_node("Gather", ["tok", "input_ids"], ["t"]),
                               helper.make_node("Gather", ["pos", "position_ids"], ["p"]),
                               helper.make_node("Add", ["t", "p"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])],
                              "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"]),
                                    helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])], inits)
    model = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "lm.onnx")
    ids = rng.integers(0, 50, (10, 12)).astype(np.int64)
    np.savez(tmp_path / "one.npz", input_ids=ids, position_ids=np.arange(12, dtype=np.int64)[None])
    np.savez(tmp_path / "rows.npz", input_ids=ids, position_ids=np.tile(np.arange(12, dtype=np.int64), (10, 1)))
    out = tmp_path / "q.onnx"
    qdq.quantize(model, "int8", tmp_path / "rows.npz", output=out, progress=False, batch_size=4)
    got = [qdq.compare(model, out, tmp_path / f, progress=False, batch_size=4) for f in ("one.npz", "rows.npz")]
    assert [r.num_samples for r in got] == [10, 10]
    assert got[0].outputs[0].sqnr_db == got[1].outputs[0].sqnr_db > 30


def test_num_samples_inside_a_static_batch_is_rounded_up(tmp_path: Path) -> None:
    """A (16) vector model fed one (16) vector: --num-samples 4 used to calibrate on 4 values padded with copies of
    themselves (a 5.5 dB model); it now takes the whole static batch."""
    model = _save(_vector_model(), tmp_path / "vec.onnx")
    np.save(tmp_path / "one.npy", np.random.default_rng(1).standard_normal(16).astype(np.float32))
    assert len(open_data(tmp_path / "one.npy", model_inputs(onnx.load(model)), num_samples=4)) == 16
