"""Placement: which tensors get QDQ pairs, with which spec, and the rules that must not fire."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from qdq import ConfigError, ModuleQuantizerConfig, QuantizationSpec, QuantizerConfig
from qdq.dtypes import QDType
from qdq.passes.annotate import annotate
from qdq.spec import QScheme


def _plan(path, config=None):
    return annotate(ir.load(path), config or QuantizerConfig())


def test_digits_default_placement(digits_onnx) -> None:
    plan = _plan(digits_onnx)
    t = plan.targets
    weights = {k for k, v in t.items() if v.kind == "weight"}
    assert weights == {"conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"}
    assert all(t[w].layout.axis == 0 for w in weights)  # Conv: out channels; Gemm transB=1: rows
    # Conv -> Relu is fused: the pair sits after the Relu and is asymmetric (known range).
    assert t["relu"].spec.qscheme is QScheme.ASYMMETRIC and "getitem" not in t
    # MaxPool passes qparams through instead of re-quantizing.
    assert t["max_pool2d"].shared_with == "relu_1"
    # The graph input is quantized for its consumer; logits (Gemm output) symmetric.
    assert t["x"].uses is not None and t["linear"].spec.qscheme is QScheme.SYMMETRIC
    # Biases stay float by default (finalize turns them into int32 for ORT).
    assert not any("bias" in k for k in t)


def test_relu6_clip_output_is_asymmetric(model_dir) -> None:
    """Clip(min=0, max=6) has a known non-negative range: asymmetric like Relu (a Clip min of 0.0 counts)."""
    import torch
    from torch import nn

    from qdq.torch_export import export

    path = export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6()).eval(), (torch.randn(2, 3, 8, 8),),
                  model_dir / "relu6.onnx")
    plan = _plan(path)
    (act,) = [t for t in plan.targets.values() if t.kind == "activation" and t.uses is None]
    assert act.spec.qscheme is QScheme.ASYMMETRIC


def test_int64_index_math_is_never_quantized(attention_onnx) -> None:
    model = ir.load(attention_onnx)
    plan = annotate(model, QuantizerConfig())
    values = {v.name: v for n in model.graph for v in n.outputs} | {v.name: v for v in model.graph.inputs}
    values |= dict(model.graph.initializers)
    for target in plan.targets.values():
        assert values[target.tensor].dtype == ir.DataType.FLOAT


def test_attention_matmul_weights_and_shared_inputs(attention_onnx) -> None:
    plan = _plan(attention_onnx)
    t = plan.targets
    # x feeds three projections (one pair for all of them) and the residual Add before LayerNorm, which
    # computes in float (a float island: nothing after it reads integers), so it reads x unquantized.
    assert sorted(n for n, _ in t["x"].uses) == ["node_MatMul_1", "node_MatMul_3", "node_MatMul_5"]
    weights = [v for v in t.values() if v.kind == "weight"]
    assert len(weights) == 4 and all(w.layout.axis == 1 for w in weights)  # MatMul B is [in, out]
    assert t["transpose"].shared_with == "linear_1"


def test_op_type_none_and_precedence(digits_onnx) -> None:
    cfg = QuantizerConfig(
        op_type_configs={"Gemm": None, "Conv": ModuleQuantizerConfig(
            op_state_spec={"weight": QuantizationSpec(dtype="int4", granularity={"type": "per_channel"})})},
        op_name_configs={"node_Conv_35": ModuleQuantizerConfig(
            op_state_spec={"weight": QuantizationSpec(dtype="uint8", granularity={"type": "per_channel"})})},
    )
    t = _plan(digits_onnx, cfg).targets
    assert "fc.weight" not in t and "linear" not in t
    assert t["conv1.weight"].spec.dtype is QDType.UINT8  # op name beats op type
    assert t["conv2.weight"].spec.dtype is QDType.INT4


def test_regex_op_names(digits_onnx) -> None:
    cfg = QuantizerConfig(op_name_configs={"node_Conv_.*": None})
    t = _plan(digits_onnx, cfg).targets
    assert "conv1.weight" not in t and "conv2.weight" not in t and "conv3.weight" in t


def test_unknown_op_name_lists_close_matches(digits_onnx) -> None:
    with pytest.raises(ConfigError, match="close matches: .*node_Conv_35") as info:
        _plan(digits_onnx, QuantizerConfig(op_name_configs={"node_Conv_53": None}))
    assert "\n" not in str(info.value)


def test_unknown_op_type_lists_model_types(digits_onnx) -> None:
    with pytest.raises(ConfigError, match="close matches: Conv"):
        _plan(digits_onnx, QuantizerConfig(op_type_configs={"Convv": None}))


def test_torch_type_aliases(digits_onnx) -> None:
    t = _plan(digits_onnx, QuantizerConfig(op_type_configs={"conv2d": None})).targets
    assert not any(k.startswith("conv") and k.endswith("weight") for k in t)


def test_conflicting_dtypes_get_separate_pairs(digits_onnx) -> None:
    fp8 = QuantizationSpec(dtype="float8_e4m3fn")
    cfg = QuantizerConfig(op_name_configs={"node_max_pool2d": None, "node_conv2d_2": ModuleQuantizerConfig(
        op_input_spec={"*": fp8}, op_output_spec={"*": fp8})})
    t = _plan(digits_onnx, cfg).targets
    consumer = [v for v in t.values() if v.tensor == "max_pool2d" and v.spec.dtype is QDType.FLOAT8_E4M3FN]
    assert len(consumer) == 1 and consumer[0].uses == [("node_conv2d_2", 0)]


def test_same_dtype_consumer_reuses_producer_pair(digits_onnx) -> None:
    # conv2 reads relu (asymmetric from its producer); its own symmetric input spec collapses into that pair.
    t = _plan(digits_onnx).targets
    assert [v.key for v in t.values() if v.tensor == "relu"] == ["relu"]
    assert len(t["relu"].ops) >= 2  # the producer and its consumers share one pair


def test_transformer_ffn_residual_stays_float_cnn_residual_does_not(digits_onnx) -> None:
    """A residual Add feeding LayerNorm is a float island: its inputs (the FFN output, with a transformer's outlier
    channels) get no pair, nor does the FFN's second MatMul output (onnxruntime still runs that MatMul on integers:
    MatMulIntegerToFloat). A CNN's residual Add, read by a Conv, keeps its pairs (QLinearAdd)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("w2", (16, 8)), ("b2", (8,)), ("g", (8,)), ("beta", (8,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Gelu", ["h"], ["a"], domain=""),
             helper.make_node("MatMul", ["a", "w2"], ["f"]), helper.make_node("Add", ["f", "b2"], ["fb"]),
             helper.make_node("Add", ["fb", "x"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g", "beta"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4, 8])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    quantized = {t.tensor for t in annotate(model, QuantizerConfig()).targets.values()}
    assert {"x", "a", "w1", "w2"} <= quantized  # MatMul inputs (Gelu's output after the fused MatMul) and weights
    assert not quantized & {"h", "f", "fb", "r", "y", "b2"}
    cnn = _plan(digits_onnx).targets.values()
    residual = next(n for n in ir.load(digits_onnx).graph if n.op_type == "Add")
    assert all(v.name in {t.tensor for t in cnn} for v in residual.inputs)
    assert any(t.uses is None and residual.name in t.ops for t in cnn)  # its (Relu-fused) output pair


def test_vit_class_token_path_is_a_float_island() -> None:
    """Concat(class token, patches) -> + position -> Gather(class token) -> LayerNorm -> head: the Concat, the Add
    and the Gather only lead to LayerNorm, so none of them gets a pair (ViT int8: 14.1 -> 32.3 dB); the head's
    input (the LayerNorm output) is quantized."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 1, 8)).astype(np.float32), "cls"),
             numpy_helper.from_array(rng.standard_normal((1, 5, 8)).astype(np.float32), "pos"),
             numpy_helper.from_array(np.array(0, np.int64), "first"),
             numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Concat", ["cls", "x"], ["cat"], axis=1),
             helper.make_node("Add", ["cat", "pos"], ["h"]),
             helper.make_node("Gather", ["h", "first"], ["tok"], axis=1),
             helper.make_node("LayerNormalization", ["tok", "g", "b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    graph = helper.make_graph(nodes, "vit", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    quantized = {t.tensor for t in annotate(model, QuantizerConfig()).targets.values()}
    assert {"n", "w"} <= quantized
    assert not quantized & {"x", "cls", "cat", "pos", "h", "tok"}


def test_float_graph_outputs_leave_gemm_logits_float_but_not_conv_outputs(digits_onnx, model_dir) -> None:
    """``float_graph_outputs`` (every preset): the logits Gemm output has no pair (QGemm returns float); a Conv
    graph output keeps its pair (QLinearConv needs one), a pass-through output after it adds none."""
    import torch
    from torch import nn

    from qdq.presets import preset
    from qdq.torch_export import export

    assert "linear" in _plan(digits_onnx).targets  # coreai_opt's semantics: outputs are quantized
    plan = _plan(digits_onnx, QuantizerConfig(float_graph_outputs=True))
    assert "linear" not in plan.targets and "x" in plan.targets
    assert "linear" not in _plan(digits_onnx, preset("int8")).targets
    assert QuantizerConfig.from_dict({"float_graph_outputs": True}).to_dict()["float_graph_outputs"] is True
    with pytest.raises(ConfigError, match="float_graph_outputs must be true or false"):
        QuantizerConfig(float_graph_outputs="yes")  # type: ignore[arg-type]

    conv_out = export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval(), (torch.randn(2, 3, 8, 8),),
                      model_dir / "conv_out.onnx")
    model = ir.load(conv_out)
    plan = annotate(model, QuantizerConfig(float_graph_outputs=True))
    conv = next(n for n in model.graph if n.op_type == "Conv")
    kept = [t for t in plan.targets.values() if t.kind == "activation" and t.uses is None]
    assert [t.tensor for t in kept] == [conv.outputs[0].name]
