"""Models from opset 7 on: upgraded with onnx's version converter, quantized, close to FP32 in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq
from qdq import ModelError
from qdq.graph.opset import upgrade_proto

_IR = {7: 3, 9: 4, 11: 6, 12: 7}


def _model(opset: int, nodes: list, inits: list, out_shape: list) -> onnx.ModelProto:
    """A dynamic-batch model at ``opset``; IR < 4 lists initializers as graph inputs, as old exporters did."""
    ir_version = _IR[opset]
    extra = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits] if ir_version < 4 else []
    graph = helper.make_graph(nodes, f"opset{opset}", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     ["N", 3, 8, 8]), *extra],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def _arr(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _classifier(opset: int) -> onnx.ModelProto:
    """Conv + BatchNormalization + Relu + Dropout(ratio attr before 12) + Reshape + Gemm: logits."""
    rng = np.random.default_rng(opset)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Dropout", ["r1"], ["d"], name="drop", **({"ratio": 0.3} if opset < 12 else {})),
        helper.make_node("Reshape", ["d", "shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc"),
    ]
    inits = [_arr("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3), _arr("b1", rng.standard_normal(8) * 0.1),
             _arr("scale", rng.random(8) + 0.5), _arr("shift", rng.standard_normal(8) * 0.1),
             _arr("mean", rng.standard_normal(8) * 0.1), _arr("var", rng.random(8) + 0.5),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
             _arr("w2", rng.standard_normal((10, 8 * 8 * 8)) * 0.05), _arr("b2", rng.standard_normal(10) * 0.1)]
    return _model(opset, nodes, inits, ["N", 10])


def _upsample(opset: int) -> onnx.ModelProto:
    """Conv + Upsample (opset 7: scales attribute; 9: scales input) or Resize (11, 12)."""
    rng = np.random.default_rng(opset)
    w = _arr("w", rng.standard_normal((4, 3, 3, 3)) * 0.3)
    conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv")
    scales = _arr("scales", np.array([1, 1, 2, 2]))
    if opset == 7:
        up, inits = helper.make_node("Upsample", ["c"], ["y"], scales=[1.0, 1.0, 2.0, 2.0], name="up"), [w]
    elif opset == 9:
        up, inits = helper.make_node("Upsample", ["c", "scales"], ["y"], name="up"), [w, scales]
    else:
        roi = _arr("roi", np.zeros(0))
        up, inits = helper.make_node("Resize", ["c", "roi", "scales"], ["y"], mode="linear", name="up"), [w, roi, scales]
    return _model(opset, [conv, up], inits, ["N", 4, 16, 16])


def _softmax_4d(opset: int) -> onnx.ModelProto:
    """Softmax(axis=1) on a 4-D tensor: before opset 13 it normalises over the flattened C*H*W."""
    w = _arr("w", np.random.default_rng(opset).standard_normal((4, 3, 3, 3)) * 0.3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Softmax", ["c"], ["y"], axis=1, name="softmax")]
    return _model(opset, nodes, [w], ["N", 4, 8, 8])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


CASES = [(build, opset) for build in (_classifier, _upsample) for opset in (7, 9, 11, 12)] + [(_softmax_4d, 11)]


@pytest.mark.parametrize("build, opset", CASES, ids=[f"{b.__name__[1:]}-opset{o}" for b, o in CASES])
def test_old_opset_models_quantize_close_to_fp32(tmp_path, build, opset: int) -> None:
    model = build(opset)
    path = tmp_path / f"m{opset}.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    out = qdq.save(qdq.quantize(path, "int8", [calib[i:i + 16] for i in range(0, 64, 16)], progress=False),
                   tmp_path / "q.onnx")
    assert path.read_bytes() == before
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert q.opset_import[0].version == 13  # the lowest opset int8 needs, whatever the input had
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert not [n for n in q.graph.node if n.op_type == "Upsample"]
    ref, got = _run(model, x), _run(q, x)
    # int8 moving_average on random weights measures 19-40 dB here; a wrong upgrade is no better than another
    # sample's output (the negative control, below 5 dB on every case), so 15 dB separates the two with margin
    assert _sqnr(ref, ref[::-1]) < 5
    assert _sqnr(ref, got) > 15


@pytest.mark.parametrize("preset, opset", [("int8", 13), ("fp8", 19), ("w4", 21)])
def test_output_opset_is_the_lowest_the_dtypes_need(tmp_path, preset: str, opset: int) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_classifier(11), path)
    calib = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    final = qdq.quantize(path, preset, [calib], progress=False)
    assert final.opset_imports[""] == opset


def test_softmax_axis_semantics_survive_the_upgrade() -> None:
    """Opset-11 Softmax(axis=1) on NCHW normalises over C*H*W: the upgraded model computes the same."""
    model = _softmax_4d(11)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = _run(model, x)
    np.testing.assert_allclose(ref.reshape(2, -1).sum(1), 1.0, rtol=1e-5)  # the old semantics, as a check
    np.testing.assert_allclose(_run(upgrade_proto(model, 13), x), ref, rtol=1e-6, atol=1e-7)


def test_op_without_a_schema_is_named() -> None:
    model = _softmax_4d(11)
    model.graph.node[1].op_type = "Affine"  # an experimental op removed from ONNX: no schema, no adapter
    with pytest.raises(ModelError, match=r"Affine \(node 'softmax'\)"):
        upgrade_proto(model, 13)


def test_opset_older_than_7_is_a_clear_error(tmp_path) -> None:
    model = _softmax_4d(11)
    model.opset_import[0].version = 6
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match="opset 6; qdq reads opset 7 and newer"):
        qdq.load_model(path)


def test_caller_model_is_not_modified_by_the_upgrade() -> None:
    proto = _classifier(9)
    model = qdq.load_model(proto)
    names = [n.name for n in model.graph]
    q = qdq.Quantizer(model, "w8")
    assert model.opset_imports[""] == 9 and [n.name for n in model.graph] == names
    assert q.float_model.opset_imports[""] == 13
    assert q.input_names == ["x"]  # IR-3 initializer inputs are not model inputs
