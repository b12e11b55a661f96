"""The mirror's op table (qdq.qat.torch_ops) against onnxruntime, one single-node graph per case."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

from qdq.model_io import load_model
from qdq.qat.onnx_module import OnnxModule
from qdq.session import make_session

RNG = np.random.default_rng(0)


def _f(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


# (op, inputs: name -> array (graph input) or ("init", array) (initializer), attributes, number of outputs)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], int]] = {
    "conv_same_upper_s2": ("Conv", {"x": _f(1, 2, 7, 7), "w": ("init", _f(3, 2, 3, 3)), "b": ("init", _f(3))},
                           {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 1),
    "conv_asym_pads_group": ("Conv", {"x": _f(2, 4, 6, 5), "w": ("init", _f(4, 1, 3, 3))},
                             {"pads": [0, 1, 2, 1], "group": 4, "dilations": [1, 2]}, 1),
    "conv1d": ("Conv", {"x": _f(2, 3, 9), "w": ("init", _f(2, 3, 3))}, {"pads": [1, 1], "strides": [2]}, 1),
    "conv_transpose": ("ConvTranspose", {"x": _f(1, 2, 4, 4), "w": ("init", _f(2, 3, 3, 3)), "b": ("init", _f(3))},
                       {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, 1),
    "gemm_alpha_beta_transA": ("Gemm", {"a": _f(4, 3), "b": ("init", _f(4, 5)), "c": ("init", _f(5))},
                               {"alpha": 0.5, "beta": 2.0, "transA": 1}, 1),
    "matmul_batched": ("MatMul", {"a": _f(2, 3, 4), "b": _f(2, 4, 5)}, {}, 1),
    "einsum": ("Einsum", {"a": _f(2, 3, 4), "b": _f(2, 4, 5)}, {"equation": "bij,bjk->bik"}, 1),
    "maxpool_asym_ceil": ("MaxPool", {"x": _f(1, 2, 7, 7)},
                          {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 0}, 1),
    "avgpool_asym_exclude": ("AveragePool", {"x": _f(1, 2, 6, 6)},
                             {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 0]}, 1),
    "avgpool_include": ("AveragePool", {"x": _f(1, 2, 6, 6)},
                        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, 1),
    "global_avg": ("GlobalAveragePool", {"x": _f(2, 3, 4, 5)}, {}, 1),
    "reduce_mean_axes": ("ReduceMean", {"x": _f(2, 3, 4), "axes": ("init", _i(-1, 1))}, {"keepdims": 0}, 1),
    "reduce_sum_all": ("ReduceSum", {"x": _f(2, 3, 4)}, {}, 1),
    "reduce_max": ("ReduceMax", {"x": _f(2, 3, 4), "axes": ("init", _i(2))}, {}, 1),
    "softmax": ("Softmax", {"x": _f(2, 3, 4)}, {"axis": 1}, 1),
    "layer_norm_axis": ("LayerNormalization", {"x": _f(2, 3, 4), "s": ("init", _f(3, 4)), "b": ("init", _f(3, 4))},
                        {"axis": 1, "epsilon": 1e-3}, 1),
    "batch_norm": ("BatchNormalization", {"x": _f(2, 3, 4, 4), "s": ("init", _f(3)), "b": ("init", _f(3)),
                                          "m": ("init", _f(3)), "v": ("init", np.abs(_f(3)) + 0.5)}, {}, 1),
    "gelu_tanh": ("Gelu", {"x": _f(3, 4)}, {"approximate": "tanh"}, 1),
    "hard_swish": ("HardSwish", {"x": _f(3, 40) * 4}, {}, 1),
    "hard_sigmoid": ("HardSigmoid", {"x": _f(3, 4) * 4}, {"alpha": 0.3, "beta": 0.4}, 1),
    "leaky_relu": ("LeakyRelu", {"x": _f(3, 4)}, {"alpha": 0.2}, 1),
    "clip_min_only": ("Clip", {"x": _f(3, 4), "lo": ("init", np.float32(-0.1))}, {}, 1),
    "erf": ("Erf", {"x": _f(3, 4)}, {}, 1),
    "pow": ("Pow", {"x": np.abs(_f(3, 4)), "y": ("init", np.float32(1.5))}, {}, 1),
    "div_int": ("Div", {"x": ("init", _i(-7, 7, 9)), "y": ("init", _i(2, -2, 4))}, {}, 1),
    "where_greater": ("Where", {"c": ("init", np.array([True, False, True])), "a": _f(2, 3), "b": _f(3)}, {}, 1),
    "reshape_zero_minus1": ("Reshape", {"x": _f(2, 3, 4), "s": ("init", _i(0, -1, 2))}, {}, 1),
    "flatten_axis2": ("Flatten", {"x": _f(2, 3, 4, 5)}, {"axis": 2}, 1),
    "transpose": ("Transpose", {"x": _f(2, 3, 4)}, {"perm": [2, 0, 1]}, 1),
    "concat": ("Concat", {"a": _f(2, 3), "b": _f(2, 2)}, {"axis": -1}, 1),
    "squeeze": ("Squeeze", {"x": _f(2, 1, 3, 1), "axes": ("init", _i(-1, 1))}, {}, 1),
    "unsqueeze": ("Unsqueeze", {"x": _f(2, 3), "axes": ("init", _i(0, -1))}, {}, 1),
    "gather_negative": ("Gather", {"x": _f(3, 5), "i": ("init", _i(-1, 0, 2).reshape(1, 3))}, {"axis": 1}, 1),
    "gather_scalar": ("Gather", {"x": _f(3, 5), "i": ("init", np.asarray(1, np.int64))}, {"axis": 0}, 1),
    "gather_nd": ("GatherND", {"x": _f(4, 3, 5), "i": ("init", _i(0, 2, -1, 1, 3, 0).reshape(3, 2))}, {}, 1),
    "gather_nd_batch": ("GatherND", {"x": _f(2, 4, 3), "i": ("init", _i(1, 3, 0, 2).reshape(2, 2, 1))},
                        {"batch_dims": 1}, 1),
    "slice_negative_step": ("Slice", {"x": _f(5, 6), "st": ("init", _i(-1, 1)), "en": ("init", _i(-100, 1000)),
                                      "ax": ("init", _i(0, 1)), "sp": ("init", _i(-2, 2))}, {}, 1),
    "split_sizes": ("Split", {"x": _f(2, 7), "s": ("init", _i(3, 4))}, {"axis": 1}, 2),
    "split_even": ("Split", {"x": _f(2, 7)}, {"axis": 1, "num_outputs": 3}, 3),
    "expand": ("Expand", {"x": _f(3, 1), "s": ("init", _i(2, 1, 4))}, {}, 1),
    "tile": ("Tile", {"x": _f(2, 3), "r": ("init", _i(2, 2))}, {}, 1),
    "pad_constant": ("Pad", {"x": _f(1, 2, 3, 3), "p": ("init", _i(0, 0, 1, 0, 0, 0, 2, 1)),
                             "v": ("init", np.float32(0.5))}, {}, 1),
    "pad_reflect_axes": ("Pad", {"x": _f(1, 2, 4, 4), "p": ("init", _i(1, 2)), "v": ("init", np.float32(0)),
                                 "a": ("init", _i(-1))}, {"mode": "reflect"}, 1),
    "pad_edge": ("Pad", {"x": _f(1, 2, 3, 3), "p": ("init", _i(0, 0, 1, 1, 0, 0, 1, 1))}, {"mode": "edge"}, 1),
    "shape_slice": ("Shape", {"x": _f(2, 3, 4)}, {"start": 1, "end": -1}, 1),
    "cast_int": ("Cast", {"x": _f(3, 4) * 3}, {"to": onnx.TensorProto.INT32}, 1),
    "depth_to_space_dcr": ("DepthToSpace", {"x": _f(1, 8, 2, 3)}, {"blocksize": 2}, 1),
    "depth_to_space_crd": ("DepthToSpace", {"x": _f(1, 8, 2, 3)}, {"blocksize": 2, "mode": "CRD"}, 1),
    "space_to_depth": ("SpaceToDepth", {"x": _f(1, 2, 4, 6)}, {"blocksize": 2}, 1),
    "argmax_last": ("ArgMax", {"x": np.array([[1, 3, 3], [2, 2, 0]], np.float32)},
                    {"axis": 1, "select_last_index": 1}, 1),
    "resize_nearest_asymmetric_floor": ("Resize", {"x": _f(1, 2, 3, 4), "r": ("init", np.zeros(0, np.float32)),
                                                   "s": ("init", np.array([1, 1, 2, 3], np.float32))},
                                        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                         "nearest_mode": "floor"}, 1),
    "resize_nearest_sizes": ("Resize", {"x": _f(1, 2, 3, 4), "r": ("init", np.zeros(0, np.float32)),
                                        "s": ("init", np.zeros(0, np.float32)), "z": ("init", _i(1, 2, 7, 5))},
                             {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                              "nearest_mode": "floor"}, 1),
    "resize_bilinear_half_pixel": ("Resize", {"x": _f(2, 3, 5, 4), "r": ("init", np.zeros(0, np.float32)),
                                              "s": ("init", np.array([1, 1, 2, 2], np.float32))},
                                   {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 1),
    "resize_bilinear_align_corners_sizes": ("Resize", {"x": _f(1, 2, 4, 4), "r": ("init", np.zeros(0, np.float32)),
                                                       "s": ("init", np.zeros(0, np.float32)),
                                                       "z": ("init", _i(1, 2, 7, 9))},
                                            {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 1),
    "resize_linear_1d_downsample": ("Resize", {"x": _f(1, 2, 9), "r": ("init", np.zeros(0, np.float32)),
                                               "s": ("init", np.array([1, 1, 0.5], np.float32))},
                                    {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, 1),
    "resize_bicubic": ("Resize", {"x": _f(1, 2, 4, 5), "r": ("init", np.zeros(0, np.float32)),
                                  "s": ("init", np.array([1, 1, 2, 2], np.float32))},
                       {"mode": "cubic", "coordinate_transformation_mode": "half_pixel"}, 1),
    "constant_of_shape": ("ConstantOfShape", {"s": ("init", _i(2, 3))},
                          {"value": numpy_helper.from_array(np.array([1.5], np.float32))}, 1),
    "range": ("Range", {"a": ("init", np.asarray(1, np.int64)), "b": ("init", np.asarray(10, np.int64)),
                        "c": ("init", np.asarray(3, np.int64))}, {}, 1),
}


def _model(op: str, inputs: dict[str, Any], attrs: dict[str, Any], n_out: int) -> tuple[onnx.ModelProto, dict]:
    graph_inputs, inits, feeds = [], [], {}
    for name, value in inputs.items():
        if isinstance(value, tuple):
            inits.append(numpy_helper.from_array(np.asarray(value[1]), name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
            feeds[name] = value
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, list(inputs), outs, name="n", **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info(o, 0, None) for o in outs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True), feeds


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_onnxruntime(case: str) -> None:
    proto, feeds = _model(*CASES[case])
    model = load_model(proto)
    ref = make_session(model, level="none").run(None, feeds)
    module = OnnxModule(model).eval()
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        g = g.numpy()
        assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, r.shape, g.dtype, r.dtype)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
