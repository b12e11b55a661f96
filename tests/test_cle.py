"""Cross-layer equalization: exact in float through ReLU, ranges equalized, ReLU6 only on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qdq import ConfigError
from qdq.algorithms import build_algorithm, parse_algorithm
from qdq.session import make_session
from qdq.torch_export import export


def _net(act: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), act(), torch.nn.Conv2d(8, 8, 3, groups=8, padding=1),
                              act(), torch.nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():  # uneven channel ranges, as after BatchNorm folding
        net[0].weight.mul_(torch.logspace(-1.5, 1.5, 8).view(8, 1, 1, 1))
    return net


def _ranges(model: ir.Model) -> list[np.ndarray]:
    return [np.abs(n.inputs[1].const_value.numpy()).reshape(n.inputs[1].const_value.shape[0], -1).max(1)
            for n in model.graph if n.op_type == "Conv"]


def test_equalization_is_exact_through_relu_and_evens_ranges(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 10, 10)).astype(np.float32)
    path = export(_net(torch.nn.ReLU), (torch.from_numpy(x[:2]),), tmp_path / "relu.onnx")
    model = ir.load(path)
    before = _ranges(model)
    notes = build_algorithm("cle").apply(model, lambda: iter(()))
    assert notes[0].startswith("cle: 2 conv pairs equalized")
    ref = make_session(str(path))
    name = ref.get_inputs()[0].name
    want = ref.run(None, {name: x})[0]
    got = make_session(model).run(None, {name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    after = _ranges(model)
    spread = lambda r: float(r.max() / r.min())
    assert spread(after[0]) < 0.2 * spread(before[0])  # the first conv's output channels, 1000x apart before


def test_relu6_pairs_only_when_asked(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 10, 10)).astype(np.float32)
    path = export(_net(torch.nn.ReLU6), (torch.from_numpy(x),), tmp_path / "relu6.onnx")
    model = ir.load(path)
    assert not build_algorithm("cle").applies_to(model)
    notes = build_algorithm({"name": "cle", "relu6": True}).apply(model, lambda: iter(()))
    assert "2 ReLU6 replaced by ReLU" in notes[0] and "2 conv pairs" in notes[0]
    assert [n.op_type for n in model.graph].count("Clip") == 0
    with pytest.raises(ConfigError, match="iterations"):
        parse_algorithm("cle:iterations=0")
