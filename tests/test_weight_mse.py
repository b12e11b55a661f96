"""weight_mse: per-unit clipping of weight ranges that minimises rounding error (int4 blocks gain most)."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.calibration import QParamsCalculatorBase
from qdq.layout import QLayout
from qdq.numerics import fake_quantize
from qdq.spec import QuantizationSpec


def _err(w: np.ndarray, calc: QParamsCalculatorBase, layout: QLayout) -> float:
    qp = calc.qparams()
    return float(np.sum((fake_quantize(w, qp.scale, qp.zero_point, calc.spec.dtype, layout) - w) ** 2))


@pytest.mark.parametrize("layout", [QLayout(), QLayout(axis=0), QLayout(axis=1, block_size=16),
                                    QLayout(axis=1, block_size=24)], ids=["tensor", "channel", "block", "ragged"])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_less_rounding_error_than_static(layout: QLayout, scheme: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 64)).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 8.0  # a few outliers per unit, as in trained weights
    spec = QuantizationSpec(dtype="int4", qscheme=scheme)
    static = QParamsCalculatorBase.create(spec.replace(qparam_calculator_cls="static"), layout, is_weight=True)
    mse = QParamsCalculatorBase.create(spec.replace(qparam_calculator_cls="weight_mse"), layout, is_weight=True)
    for c in (static, mse):
        c.observe(w)
    first = mse.qparams()
    assert first.scale.shape == static.qparams().scale.shape
    assert np.array_equal(mse.qparams().scale, first.scale)  # computed once, stable
    assert np.all(first.scale <= static.qparams().scale * (1 + 1e-6))  # ranges only shrink
    assert _err(w, mse, layout) < 0.98 * _err(w, static, layout)


def test_usable_from_a_config(digits_onnx) -> None:
    import qdq

    cfg = {"global_config": {"op_state_spec": {"weight": {"dtype": "int4", "granularity": {"type": "per_channel"},
                                                          "qparam_calculator_cls": "weight_mse"}},
                             "op_input_spec": None, "op_output_spec": None}}
    model = qdq.quantize(digits_onnx, cfg, progress=False)
    assert any(n.op_type == "DequantizeLinear" for n in model.graph)
