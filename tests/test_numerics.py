"""qdq.numerics vs the ONNX conformance cases and vs onnxruntime, bit for bit."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq import numerics
from qdq.dtypes import QDType
from qdq.layout import QLayout

# --------------------------------------------------------------------------- ONNX conformance cases

_PREFIXES = ("test_quantizelinear", "test_dequantizelinear")


def _as_array(value: Any) -> np.ndarray:
    """A case input/output as numpy, round-tripped through TensorProto like the shipped .pb files."""
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    return numpy_helper.to_array(numpy_helper.from_array(np.asarray(value)))


def _load_onnx_cases() -> dict[str, tuple[onnx.ModelProto, list[np.ndarray], np.ndarray]]:
    """Every QuantizeLinear/DequantizeLinear node case of the installed onnx package.

    Reads ``onnx/backend/test/data/node/<case>`` when the package ships it; onnx 1.23 wheels
    do not, so fall back to the case generators those files are produced from
    (``onnx.backend.test.case.node.{quantizelinear,dequantizelinear}``), which hold the same
    models and tensors.
    """
    cases: dict[str, tuple[onnx.ModelProto, list[np.ndarray], np.ndarray]] = {}
    data_dir = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    if data_dir.is_dir():
        for case_dir in sorted(data_dir.iterdir()):
            if not case_dir.name.startswith(_PREFIXES):
                continue
            model = onnx.load(str(case_dir / "model.onnx"))
            ds = case_dir / "test_data_set_0"
            ins = [numpy_helper.to_array(onnx.load_tensor(str(ds / f))) for f in sorted(os.listdir(ds)) if f.startswith("input_")]
            out = numpy_helper.to_array(onnx.load_tensor(str(ds / "output_0.pb")))
            cases[case_dir.name] = (model, ins, out)
        if cases:
            return cases
    node_cases = importlib.import_module("onnx.backend.test.case.node")
    for module in ("dequantizelinear", "quantizelinear"):  # importing a module registers its cases
        importlib.import_module(f"onnx.backend.test.case.node.{module}")

    for case in node_cases._NodeTestCases:
        if case.name.startswith(_PREFIXES) and case.name not in cases:
            ins, outs = case.data_sets[0]
            cases[case.name] = (case.model, [_as_array(i) for i in ins], _as_array(outs[0]))
    return cases


_CASES = _load_onnx_cases()


def test_onnx_cases_found() -> None:
    names = set(_CASES)
    assert len(names) >= 20
    for required in (
        "test_quantizelinear", "test_quantizelinear_axis", "test_quantizelinear_blocked_asymmetric",
        "test_quantizelinear_blocked_symmetric", "test_quantizelinear_e4m3fn", "test_quantizelinear_e5m2",
        "test_quantizelinear_int4", "test_quantizelinear_uint4", "test_quantizelinear_int16",
        "test_quantizelinear_uint16", "test_dequantizelinear", "test_dequantizelinear_axis",
        "test_dequantizelinear_blocked", "test_dequantizelinear_e4m3fn", "test_dequantizelinear_e5m2",
        "test_dequantizelinear_int4", "test_dequantizelinear_uint4",
    ):
        assert required in names


def _layout(attrs: dict[str, Any], scale: np.ndarray, rank: int) -> QLayout:
    if scale.size == 1 and scale.ndim <= 1:
        return QLayout()
    axis = int(attrs.get("axis", 1)) % rank
    block = int(attrs.get("block_size", 0))
    return QLayout(axis=axis, block_size=block or None)


def assert_bit_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype, shape and bytes; NaNs of any payload count as equal."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4), np.dtype(ml_dtypes.int2), np.dtype(ml_dtypes.uint2)):
        np.testing.assert_array_equal(got.astype(np.int32), want.astype(np.int32))
        return
    if got.dtype.kind == "f" or got.dtype.kind == "V" or "float" in got.dtype.name:
        gnan = np.isnan(got.astype(np.float32))
        wnan = np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(gnan, wnan)
        got, want = got[~gnan], want[~wnan]
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("name", sorted(_CASES))
def test_onnx_conformance_case(name: str) -> None:
    model, ins, want = _CASES[name]
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert set(attrs) <= {"axis", "block_size", "saturate", "output_dtype"}, f"unhandled attributes {attrs}"
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 else None
    layout = _layout(attrs, scale, x.ndim)
    if node.op_type == "QuantizeLinear":
        got = numerics.quantize(
            x, scale, zp, dtype=want.dtype, layout=layout, saturate=bool(attrs.get("saturate", 1))
        )
    else:
        assert node.op_type == "DequantizeLinear"
        got = numerics.dequantize(x, scale, zp, layout=layout).astype(want.dtype)  # float16-scale case
    assert_bit_equal(got, want)


# --------------------------------------------------------------------------- vs onnxruntime

_TP = {
    QDType.INT8: TensorProto.INT8, QDType.UINT8: TensorProto.UINT8, QDType.INT16: TensorProto.INT16,
    QDType.UINT16: TensorProto.UINT16, QDType.INT4: TensorProto.INT4, QDType.UINT4: TensorProto.UINT4,
    QDType.FLOAT8_E4M3FN: TensorProto.FLOAT8E4M3FN, QDType.FLOAT8_E5M2: TensorProto.FLOAT8E5M2,
}
# ORT's Python API cannot return int4/float8 tensors: cast them to a type it can (exactly).
_READABLE = {
    QDType.INT4: (TensorProto.INT8, np.int8), QDType.UINT4: (TensorProto.UINT8, np.uint8),
    QDType.FLOAT8_E4M3FN: (TensorProto.FLOAT, np.float32), QDType.FLOAT8_E5M2: (TensorProto.FLOAT, np.float32),
}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], out_type: int,
           inits: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", out_type, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _layout_attrs(layout: QLayout) -> dict[str, int]:
    attrs: dict[str, int] = {}
    if layout.axis is not None:
        attrs["axis"] = layout.axis
    if layout.block_size is not None:
        attrs["block_size"] = layout.block_size
    return attrs


def ort_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: QDType, layout: QLayout,
                 saturate: bool = True) -> np.ndarray:
    """QuantizeLinear (opset 21) in onnxruntime, returned as ``dtype.np_dtype``."""
    inits = [numpy_helper.from_array(scale.astype(np.float32), "s"), numpy_helper.from_array(zp.astype(dtype.np_dtype), "z")]
    attrs = _layout_attrs(layout)
    if dtype.is_float:
        attrs["saturate"] = int(saturate)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs)]
    out_type, read_np = _READABLE.get(dtype, (_TP[dtype], dtype.np_dtype))
    nodes.append(helper.make_node("Cast", ["q"], ["out"], to=out_type) if dtype in _READABLE else helper.make_node("Identity", ["q"], ["out"]))
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)], out_type, inits)
    y = np.asarray(_session(model).run(None, {"x": x})[0])
    if y.dtype != np.dtype(read_np):  # ORT hands float8 over as raw uint8 bits
        y = y.view(read_np)
    return y.astype(dtype.np_dtype)


def ort_dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, dtype: QDType, layout: QLayout) -> np.ndarray:
    """DequantizeLinear (opset 21) in onnxruntime; ``q`` is an initializer so any dtype can be fed."""
    inits = [
        numpy_helper.from_array(q.astype(dtype.np_dtype), "q"),
        numpy_helper.from_array(scale.astype(np.float32), "s"),
        numpy_helper.from_array(zp.astype(dtype.np_dtype), "z"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["out"], **_layout_attrs(layout))]
    return np.asarray(_session(_model(nodes, [], TensorProto.FLOAT, inits)).run(None, {})[0])


_SHAPE = (4, 6, 40)
_LAYOUTS = {
    "per_tensor": QLayout(),
    "per_channel": QLayout(axis=1),
    "per_block": QLayout(axis=2, block_size=16),  # ragged last block (40 = 16 + 16 + 8)
}


def _random_case(dtype: QDType, layout: QLayout, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs covering random values, exact .5 ties, saturation and zero points."""
    rng = np.random.default_rng(seed)
    pshape = layout.param_shape(_SHAPE)
    if dtype.is_float:
        # power-of-two and arbitrary scales; values well inside, at the edge of and beyond the range
        scale = np.where(rng.random(pshape) < 0.5, 2.0 ** rng.integers(-6, 3, pshape), rng.uniform(0.01, 2.0, pshape)).astype(np.float32)
        zp = np.zeros(pshape, np.float32)
        mag = np.float32(dtype.qmax)
        x = layout.expand(scale, _SHAPE) * rng.standard_normal(_SHAPE).astype(np.float32) * rng.choice([1e-3, 1.0, 30.0, mag / 4, mag * 2], _SHAPE)
        flat = x.reshape(-1)
        flat[:8] = [0.0, -0.0, mag, -mag, mag * 1.03, -mag * 1.2, np.float32(1e30), -np.float32(1e30)]
        return flat.reshape(_SHAPE).astype(np.float32), scale, zp
    qmin, qmax = int(dtype.qmin), int(dtype.qmax)
    scale = np.where(rng.random(pshape) < 0.5, 2.0 ** rng.integers(-8, 2, pshape), rng.uniform(1e-3, 1.0, pshape)).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, pshape).astype(np.int32)
    span = qmax - qmin
    k = rng.integers(-span - 4, span + 4, _SHAPE)  # x/scale + zp covers beyond both ends (saturation)
    ties = (k + 0.5).astype(np.float32) * layout.expand(scale, _SHAPE)  # exact ties for power-of-two scales
    noise = rng.uniform(-span * 1.2, span * 1.2, _SHAPE).astype(np.float32) * layout.expand(scale, _SHAPE)
    x = np.where(rng.random(_SHAPE) < 0.5, ties, noise).astype(np.float32)
    return x, scale, zp


@pytest.mark.parametrize("layout_name", sorted(_LAYOUTS))
@pytest.mark.parametrize("dtype", list(QDType), ids=str)
def test_quantize_matches_onnxruntime(dtype: QDType, layout_name: str) -> None:
    layout = _LAYOUTS[layout_name]
    for seed in range(3):
        x, scale, zp = _random_case(dtype, layout, seed)
        got = numerics.quantize(x, scale, zp, dtype, layout)
        assert_bit_equal(got, ort_quantize(x, scale, zp, dtype, layout))
        if not dtype.is_float:
            # ties really are exercised: some x/scale sit exactly on k + 0.5
            r = x / layout.expand(scale, x.shape)
            assert np.any(r - np.floor(r) == 0.5)
            assert np.any(got.astype(np.int32) == qmin_of(dtype)) and np.any(got.astype(np.int32) == int(dtype.qmax))


def qmin_of(dtype: QDType) -> int:
    return int(dtype.qmin)


@pytest.mark.parametrize("dtype", [QDType.FLOAT8_E4M3FN, QDType.FLOAT8_E5M2], ids=str)
@pytest.mark.parametrize("saturate", [True, False])
def test_float8_saturation_matches_onnxruntime(dtype: QDType, saturate: bool) -> None:
    mag = np.float32(dtype.qmax)
    x = np.array([0.0, -0.0, 1.0, mag, -mag, mag * 1.02, mag * 1.2, -mag * 4, 1e30, -1e30, np.inf, -np.inf, np.nan], np.float32)
    scale = np.float32(1.0)
    got = numerics.quantize(x, scale, np.float32(0), dtype, saturate=saturate)
    want = ort_quantize(x, np.asarray(scale), np.zeros((), np.float32), dtype, QLayout(), saturate)
    if dtype is QDType.FLOAT8_E5M2 and saturate:
        # ONNX reference (and qdq) clamp +-inf to +-max; the ONNX spec table and ORT keep +-inf for e5m2.
        fin = np.isfinite(x) | np.isnan(x)
        assert_bit_equal(got[fin], want[fin])
        assert np.all(got[~fin].astype(np.float32) == np.sign(x[~fin]) * mag)
    else:
        assert_bit_equal(got, want)
    big = got.astype(np.float32)[np.isfinite(x) & (np.abs(x) > mag * 1.1)]
    if saturate:
        assert np.all(np.abs(big) == mag)
    elif dtype is QDType.FLOAT8_E4M3FN:
        assert np.all(np.isnan(big))
    else:
        assert np.all(np.isinf(big))


@pytest.mark.parametrize("layout_name", sorted(_LAYOUTS))
@pytest.mark.parametrize("dtype", list(QDType), ids=str)
def test_dequantize_matches_onnxruntime(dtype: QDType, layout_name: str) -> None:
    layout = _LAYOUTS[layout_name]
    x, scale, zp = _random_case(dtype, layout, 7)
    q = numerics.quantize(x, scale, zp, dtype, layout)
    got = numerics.dequantize(q, scale, zp, layout)
    assert got.dtype == np.float32
    assert_bit_equal(got, ort_dequantize(q, scale, zp, dtype, layout))
    # fake_quantize is exactly dequantize(quantize(.))
    assert_bit_equal(numerics.fake_quantize(x, scale, zp, dtype, layout), got)


# --------------------------------------------------------------------------- small direct checks


def test_round_half_to_even_and_clamp() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1000.0, -1000.0], np.float32)
    q = numerics.quantize(x, np.float32(1.0), np.int32(0), QDType.INT8)
    np.testing.assert_array_equal(q, np.array([0, 2, 2, 0, -2, -2, 127, -128], np.int8))
    q = numerics.quantize(x, np.float32(1.0), np.int32(3), QDType.UINT4)
    np.testing.assert_array_equal(q.astype(np.int32), [3, 5, 5, 3, 1, 1, 15, 0])


def test_division_not_reciprocal() -> None:
    # x * (1/s) differs from x / s in the last float32 bit often enough to move some codes across a tie.
    rng = np.random.default_rng(0)
    s = np.float32(1 / 3)
    x = rng.standard_normal(1_000_000).astype(np.float32) * np.float32(100) * s
    by_div = np.rint(x / s)
    by_mul = np.rint(x * (np.float32(1) / s))
    assert np.any(by_div != by_mul)  # the two formulas really differ on this data
    q = numerics.quantize(x, s, np.int32(0), QDType.INT16)
    np.testing.assert_array_equal(q.astype(np.float32), np.clip(by_div, -32768, 32767))


def test_zero_point_dtypes_accepted() -> None:
    x = np.linspace(-3, 3, 25, dtype=np.float32)
    a = numerics.quantize(x, np.float32(0.05), np.int32(-3), QDType.INT4)
    b = numerics.quantize(x, np.float32(0.05), np.array(-3, ml_dtypes.int4), QDType.INT4)
    c = numerics.quantize(x, np.float32(0.05), np.float32(-3), QDType.INT4)
    assert a.dtype == np.dtype(ml_dtypes.int4)
    np.testing.assert_array_equal(a.astype(np.int8), b.astype(np.int8))
    np.testing.assert_array_equal(a.astype(np.int8), c.astype(np.int8))


def test_nan_maps_to_qmin_for_integers() -> None:
    q = numerics.quantize(np.array([np.nan], np.float32), np.float32(1), np.int32(128), QDType.UINT8)
    assert q[0] == 0


def test_float8_nonzero_zero_point_rejected() -> None:
    with pytest.raises(ValueError):
        numerics.quantize(np.ones(3, np.float32), np.float32(1), np.float32(1), QDType.FLOAT8_E4M3FN)
