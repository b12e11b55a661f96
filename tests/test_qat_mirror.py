"""The torch mirror (qdq.qat) against the ONNX side: placement, qparams, codes, export, schedule, errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from qdq.backends import ExportBackend
from qdq.config import QuantizerConfig
from qdq.errors import ConfigError, ModelError
from qdq.model_io import load_model
from qdq.qat import QATQuantizer, QATSchedule
from qdq.qat.parity import CodeParity, code_parity, summarize, unexplained
from qdq.quantizer import Quantizer, finalize_model
from qdq.session import make_session

DTYPES = ["int8", "uint8", "int4", "float8_e4m3fn"]
SEED = int(os.environ.get("QDQ_TEST_SEED", "0"))  # vary it to check that no assertion rests on one draw


def _config(dtype: str, **extra: Any) -> QuantizerConfig:
    act = {"dtype": dtype}
    return QuantizerConfig.from_dict({
        "global_config": {"op_state_spec": {"weight": {"dtype": dtype, "granularity": "per_channel"}},
                          "op_input_spec": {"*": act}, "op_output_spec": {"*": act}},
        **extra,
    })


@pytest.fixture(scope="module")
def effnet_onnx(model_dir: Path) -> Path:
    """EfficientNet-Lite0's stem and first four MBConv blocks (BN folded, ReLU6, a residual Add)."""
    from models.efficientnet import load_efficientnet_lite0
    from qdq.torch_export import export

    net = load_efficientnet_lite0()

    class Stem4(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
            self.blocks = torch.nn.ModuleList(net._blocks[:4])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.bn0(self.stem(x)))
            for block in self.blocks:
                x = block(x)
            return x

    return export(Stem4().eval(), (torch.zeros(2, 3, 64, 64),), model_dir / "effnet_stem4.onnx")


@pytest.fixture(scope="module")
def cases(digits_onnx: Path, attention_onnx: Path, effnet_onnx: Path, digits_data) -> dict[str, Any]:
    x_tr, _, x_te, _ = digits_data
    gen = torch.Generator().manual_seed(SEED)
    return {
        "digits": (digits_onnx, [x_tr[i:i + 64] for i in range(0, 256, 64)], x_te[:200]),
        "attention": (attention_onnx, [torch.randn(4, 8, 16, generator=gen).numpy() for _ in range(4)],
                      torch.randn(8, 8, 16, generator=gen).numpy()),
        "effnet": (effnet_onnx, [torch.randn(2, 3, 64, 64, generator=gen).numpy() for _ in range(3)],
                   torch.randn(2, 3, 64, 64, generator=gen).numpy()),
    }


def _assert_codes_agree(parity: dict[str, CodeParity], *, free_running: bool = False) -> None:
    """Codes agree up to float summation order (see qdq.qat.parity), no fixed fraction.

    Teacher-forced, each target's codes come from one op on identical inputs, so a code may differ
    only by one step and only where onnxruntime's pre-rounding value lies within the float32 error
    bound of a rounding boundary ("near"). Free-running, the same holds for every target whose
    upstream codes all agree; downstream of a difference the inputs differ, and codes may too.
    """
    assert not unexplained(parity), unexplained(parity)
    if not free_running:
        assert summarize(parity)[2] <= 1, summarize(parity)


def _both_sides(path: Path, config: QuantizerConfig, calib: list[np.ndarray]) -> tuple[QATQuantizer, Quantizer]:
    qat = QATQuantizer(path, config)
    qmodel = qat.prepare(calib[0])
    with qat.calibration_mode():
        for batch in calib:
            qmodel(torch.from_numpy(batch))
    onnx_q = Quantizer(path, config)
    prepared = onnx_q.prepare(calib[0])
    with onnx_q.calibration_mode():
        for batch in calib:
            prepared(batch)
    return qat, onnx_q


def _qdq_placement(model: Any) -> set[tuple[Any, ...]]:
    """(Q name, float tensor, target, kind, shared_with, DQ consumers) of every pair of a QDQ model."""
    out = set()
    for node in load_model(model).graph:
        if node.op_type != "QuantizeLinear":
            continue
        dq = next(iter(node.outputs[0].uses())).node
        users = tuple(sorted((u.node.name, u.idx) for u in dq.outputs[0].uses()))
        meta = node.metadata_props
        out.add((node.name, node.inputs[0].name, meta.get("qdq.target"), meta.get("qdq.kind"),
                 meta.get("qdq.shared_with"), users, dq.outputs[0].is_graph_output()))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["digits", "attention", "effnet"])
def test_parity_with_onnx_side(cases: dict[str, Any], name: str, dtype: str, tmp_path: Path) -> None:
    path, calib, test_x = cases[name]
    config = _config(dtype)
    qat, onnx_q = _both_sides(path, config, calib)
    mirror = qat.model
    assert mirror is not None

    # placement: one fake-quant site per planned pair, same tensors, kinds and sharing
    assert set(mirror.sites) == set(onnx_q.targets)
    for key, target in onnx_q.targets.items():
        site = mirror.sites[key]
        assert (site.tensor, site.kind, site.root) == (target.tensor, target.kind, onnx_q.plan.root(key))
        assert mirror.fake_quant(key).layout == onnx_q.targets[onnx_q.plan.root(key)].layout
    exported = qat.export(tmp_path / "qat.onnx")
    assert _qdq_placement(exported) == _qdq_placement(onnx_q.qdq_model())

    # qparams from the same calibration data
    ref, got = onnx_q.qparams, qat.qparams
    assert set(ref) == set(got)
    for key in ref:
        np.testing.assert_allclose(got[key].scale, ref[key].scale, rtol=1e-6, atol=0, err_msg=key)
        np.testing.assert_array_equal(got[key].zero_point, ref[key].zero_point, err_msg=key)

    # integer codes at every quantized tensor: onnxruntime (the export) vs the mirror in eval mode
    _assert_codes_agree(code_parity(mirror, exported, test_x, teacher_forcing=True))
    _assert_codes_agree(code_parity(mirror, exported, test_x), free_running=True)


def test_quantize_bias_matches_onnxruntime_int32_bias(cases: dict[str, Any], tmp_path: Path) -> None:
    """With quantize_bias the mirror rounds Conv/Gemm biases to int32 as onnxruntime does from 'basic' on."""
    path, calib, test_x = cases["digits"]
    qat = QATQuantizer(path, _config("int8"), quantize_bias=True)
    qat.prepare(calib[0])
    qat.calibrate(calib)
    exported = qat.export(tmp_path / "biasq.onnx")
    basic = code_parity(qat.model, exported, test_x, teacher_forcing=True, level="basic")
    _assert_codes_agree(basic)
    plain = code_parity(qat.model, exported, test_x, teacher_forcing=True, level="none")
    assert unexplained(plain)  # the bias rounding is visible in the codes, beyond float summation order
    assert summarize(plain)[0] < summarize(basic)[0]


def test_parity_consumer_specific_pairs(attention_onnx: Path, cases: dict[str, Any], tmp_path: Path) -> None:
    """int16 MatMul inputs next to int8 producers: extra pairs on the float tensor for one consumer."""
    config = QuantizerConfig.from_dict({"op_type_configs": {"MatMul": {"op_input_spec": {"*": {"dtype": "int16"}}}}})
    _, calib, test_x = cases["attention"]
    qat, onnx_q = _both_sides(attention_onnx, config, calib)
    assert any(t.uses for t in onnx_q.targets.values())
    exported = qat.export(tmp_path / "mixed.onnx")
    assert _qdq_placement(exported) == _qdq_placement(onnx_q.qdq_model())
    _assert_codes_agree(code_parity(qat.model, exported, test_x, teacher_forcing=True))
    _assert_codes_agree(code_parity(qat.model, exported, test_x), free_running=True)


def test_load_qparams_reproduces_onnx_prepared_outputs(digits_onnx: Path, digits_data) -> None:
    x_tr, _, x_te, _ = digits_data
    config = QuantizerConfig.from_dict(
        {"global_config": {"op_state_spec": {"weight": {"dtype": "int4", "granularity": "per_channel"}}}})
    onnx_q = Quantizer(digits_onnx, config)
    prepared = onnx_q.prepare(x_tr[:8])
    with onnx_q.calibration_mode():
        for i in range(0, 512, 64):
            prepared(x_tr[i:i + 64])
    qat = QATQuantizer(digits_onnx, config)
    mirror = qat.prepare(x_tr[:8])
    qat.load_qparams(onnx_q)
    for key, qp in onnx_q.qparams.items():
        assert np.array_equal(qat.qparams[key].scale, qp.scale), key
    ref = prepared(x_te)
    mirror.eval()
    with torch.no_grad():
        got = mirror(torch.from_numpy(x_te)).numpy()
    steps = np.abs(got - ref) / float(onnx_q.qparams["linear"].scale)
    free = code_parity(mirror, onnx_q.qdq_model(), x_te)
    _assert_codes_agree(free, free_running=True)
    _assert_codes_agree(code_parity(mirror, onnx_q.qdq_model(), x_te, teacher_forcing=True))
    # the logits are the dequantized codes of "linear": they differ exactly where those codes do
    assert int((steps > 1e-3).sum()) == free["linear"].total - free["linear"].equal

    # freeze=True keeps activation qparams through training steps; weights follow the schedule
    qat.load_qparams(prepared, freeze=True)
    mirror.train()
    mirror(torch.from_numpy(x_tr[:64])).sum().backward()
    qat.step()
    assert np.array_equal(qat.qparams["relu"].scale, onnx_q.qparams["relu"].scale)


def test_export_writes_trained_values_and_finalizes(digits_onnx: Path, digits_data, tmp_path: Path) -> None:
    x_tr, _, x_te, _ = digits_data
    qat = QATQuantizer(digits_onnx, QuantizerConfig())
    mirror = qat.prepare(x_tr[:32])
    with torch.no_grad():
        mirror.tensor("conv3.weight").mul_(1.01)
        mirror.fake_quant("relu").scale.mul_(1.5)
    path = qat.export(tmp_path / "trained.onnx", x_te[:16])
    model = load_model(path)
    inits = model.graph.initializers
    assert np.array_equal(inits["conv3.weight"].const_value.numpy(), mirror.tensor("conv3.weight").detach().numpy())
    assert np.array_equal(inits["relu_scale"].const_value.numpy(), mirror.fake_quant("relu").scale.detach().numpy())
    assert qat.compare_with_onnxruntime(model, x_te[:64]) <= 2 * float(qat.qparams["linear"].scale)
    final = finalize_model(path, ExportBackend.ONNXRuntime)
    direct = load_model(qat.export(tmp_path / "final.onnx", backend=ExportBackend.ONNXRuntime))
    for m in (final, direct):
        assert not any(n.op_type == "QuantizeLinear" and n.inputs[0].is_initializer() for n in m.graph)
        out = make_session(m).run(None, {"x": x_te[:64]})[0]
        assert out.shape == (64, 10)


def test_lsq_gives_gradients_to_weights_and_scales(digits_onnx: Path, digits_data) -> None:
    x_tr, y_tr, _, _ = digits_data
    config = QuantizerConfig.from_yaml(
        "global_config:\n  op_state_spec:\n    weight: {dtype: int4, granularity: per_channel}\n"
        "qat_schedule:\n  learnable_scale: true\n"
    )
    qat = QATQuantizer(digits_onnx, config)
    mirror = qat.prepare(x_tr[:32])
    qat.calibrate([x_tr[i:i + 64] for i in range(0, 256, 64)])
    scales = {k: fq.scale for k, fq in mirror.roots() if mirror.root_site(k).kind != "constant"}
    assert all(isinstance(s, torch.nn.Parameter) for s in scales.values())
    mirror.train()
    loss = torch.nn.functional.cross_entropy(mirror(torch.from_numpy(x_tr[:64])), torch.from_numpy(y_tr[:64]))
    loss.backward()
    for name, p in mirror.onnx_parameters().items():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    for key, s in scales.items():
        assert s.grad is not None and torch.isfinite(s.grad).all(), key
    assert torch.count_nonzero(scales["conv2.weight"].grad) > 0
    # learnable scales are not overwritten by observers once fake quant is on
    before = scales["relu"].detach().clone()
    mirror(torch.from_numpy(x_tr[64:128]))
    assert torch.equal(before, scales["relu"].detach())


def test_schedule_milestones_from_yaml(digits_onnx: Path, digits_data) -> None:
    x_tr, _, _, _ = digits_data
    config = QuantizerConfig.from_yaml("qat_schedule:\n  milestones: [0, 2, 3, null]\n")
    qat = QATQuantizer(digits_onnx, config)
    assert qat.schedule == QATSchedule(enable_observer=0, enable_fake_quant=2, disable_observer=3)
    mirror = qat.prepare(x_tr[:32])
    mirror.train()
    fq = mirror.fake_quant("relu")
    states = []
    for _ in range(4):
        before = fq.scale.clone()
        out = mirror(torch.from_numpy(x_tr[:64] * 2))
        states.append((fq.observer_enabled, fq.fake_quant_enabled, not torch.equal(before, fq.scale)))
        out.sum().backward()
        qat.step()
    assert states == [(True, False, True), (True, False, True), (True, True, True), (False, True, False)]


def test_schedule_rejects_bad_keys() -> None:
    with pytest.raises(ConfigError, match="valid keys"):
        QATSchedule.from_dict({"enable_fakequant": 3})
    with pytest.raises(ConfigError, match="milestones"):
        QATSchedule.from_dict({"milestones": [0, 1]})
    with pytest.raises(ConfigError, match="not both"):
        QATSchedule.from_dict({"milestones": [0, 1, 2, 3], "freeze_bn": 1})
    with pytest.raises(ConfigError, match="step number"):
        QATSchedule.from_dict({"enable_observer": -1})


def _conv_then(op: str, tmp_path: Path, extra_nodes: list[Any] | None = None, extra_inits: list[Any] | None = None,
               **attrs: Any) -> Path:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], rng.normal(size=36).astype(np.float32).tolist())
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             *(extra_nodes or []),
             helper.make_node(op, ["r" if not extra_nodes else extra_nodes[-1].output[0]], ["y"], name="tail", **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, *(extra_inits or [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / f"{op}.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(model), path)
    return path


def test_unknown_op_names_the_node_and_falls_back_when_float(tmp_path: Path) -> None:
    path = _conv_then("Hardmax", tmp_path, axis=-1)
    x = np.random.default_rng(1).normal(size=(2, 1, 6, 6)).astype(np.float32)
    with pytest.raises(ModelError, match=r"node 'tail' \(Hardmax\).*op_name_configs=\{'tail': None\}"):
        QATQuantizer(path).prepare(x)
    qat = QATQuantizer(path, {"op_name_configs": {"tail": None}})
    mirror = qat.prepare(x)
    mirror.eval()
    with torch.no_grad():
        got = mirror(torch.from_numpy(x)).numpy()
    ref = make_session(qat.qdq_model(), level="basic").run(None, {"x": x})[0]
    assert np.array_equal(got, ref)
    mirror.train()
    with pytest.raises(ModelError, match="gradients cannot flow"):
        mirror(torch.from_numpy(x))


def test_unfolded_batchnorm_trains_until_freeze_bn(tmp_path: Path) -> None:
    c = 4
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [c], v) for n, v in
             (("s", [1.0] * c), ("b", [0.0] * c), ("m", [0.0] * c), ("v", [1.0] * c))]
    path = _conv_then("Identity", tmp_path, extra_nodes=[
        helper.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["bn"], name="bn", momentum=0.9)],
        extra_inits=inits)
    qat = QATQuantizer(path, {"qat_schedule": {"freeze_bn": 1}})
    x = np.random.default_rng(2).normal(size=(8, 1, 6, 6)).astype(np.float32)
    mirror = qat.prepare(x)
    mirror.train()
    mean = mirror.tensor("m")
    assert not isinstance(mean, torch.nn.Parameter) and isinstance(mirror.tensor("s"), torch.nn.Parameter)
    mirror(torch.from_numpy(x))
    after_train = mean.clone()
    assert not torch.equal(after_train, torch.zeros(c))
    qat.step()
    mirror(torch.from_numpy(x))
    assert torch.equal(mean, after_train)
    written = qat.qdq_model().graph.initializers["m"].const_value.numpy()
    assert np.array_equal(written, after_train.numpy())
