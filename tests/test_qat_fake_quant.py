"""qdq.qat.fake_quant vs the reference numerics (qdq.numerics), bit for bit; STE and LSQ gradients."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qdq import numerics
from qdq.dtypes import QDType
from qdq.layout import QLayout
from qdq.qat.fake_quant import FakeQuantize, fake_quantize, quantize_codes
from qdq.qparams import QParams
from qdq.spec import QuantizationSpec

_LAYOUTS = {
    "per_tensor": QLayout(),
    "per_channel": QLayout(axis=1),
    "per_block": QLayout(axis=2, block_size=2),
}


def _case(dtype: QDType, layout: QLayout, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(3, 4, 5)) * 4).astype(np.float32)
    shape = layout.param_shape(x.shape)
    scale = np.asarray(rng.uniform(0.01, 0.2, size=shape), np.float32)
    if dtype.is_float:
        scale = np.asarray(scale * np.float32(0.01), np.float32)
        zp = np.zeros(shape, np.float32)
    else:
        mid = 0 if dtype.is_signed else (dtype.qmax + 1) // 2
        span = max(1, int((dtype.qmax - dtype.qmin) // 8))
        zp = np.asarray(mid + rng.integers(-span, span + 1, size=shape), np.int32)
    # exact ties (x / scale = k + 0.5), far out of range values and zeros
    flat_scale = layout.expand(scale, x.shape) * np.ones_like(x)
    x.reshape(-1)[:6] = (np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
                         * flat_scale.reshape(-1)[:6]).astype(np.float32)
    x.reshape(-1)[6:9] = [1e6, -1e6, 0.0]
    return x, scale, zp


@pytest.mark.parametrize("layout_name", list(_LAYOUTS))
@pytest.mark.parametrize("dtype", list(QDType), ids=str)
def test_fake_quantize_is_bit_exact(dtype: QDType, layout_name: str) -> None:
    layout = _LAYOUTS[layout_name]
    x, scale, zp = _case(dtype, layout)
    zp_q = None if dtype.is_float else zp
    ref = numerics.fake_quantize(x, scale, zp_q, dtype, layout)
    got = fake_quantize(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp.astype(np.float32)),
                        dtype, layout).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))
    codes = quantize_codes(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp.astype(np.float32)),
                           dtype, layout).numpy()
    ref_codes = numerics.quantize(x, scale, zp_q, dtype, layout).astype(np.float32)
    assert np.array_equal(ref_codes, codes)


def test_round_half_to_even_and_nan() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, float("nan")])
    y = fake_quantize(x, torch.tensor(1.0), torch.tensor(0.0), QDType.INT8)
    assert y[:5].tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]
    assert y[5].item() == -128.0  # NaN -> qmin, as the ONNX reference and onnxruntime
    f8 = fake_quantize(torch.tensor([float("nan"), 1e9]), torch.tensor(1.0), torch.tensor(0.0), QDType.FLOAT8_E4M3FN)
    assert torch.isnan(f8[0]) and f8[1].item() == 448.0  # saturate=True


def test_ste_gradient_is_masked_outside_the_grid() -> None:
    x = torch.tensor([-300.0, -1.2, 0.3, 126.9, 300.0], requires_grad=True)
    fake_quantize(x, torch.tensor(1.0), torch.tensor(0.0), QDType.INT8).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_scale_gradient_matches_formula() -> None:
    x = torch.tensor([0.26, -0.74, 3.0, -9.0])
    scale = torch.tensor([0.1], requires_grad=True)
    zp = torch.tensor([0.0])
    y = fake_quantize(x, scale.reshape(()), zp.reshape(()), QDType.INT4, QLayout(), grad_factor=1.0)
    y.sum().backward()
    # inside the grid: round(x/s) - x/s ; outside: the clamped code
    q = np.clip(np.rint(x.numpy() / 0.1), -8, 7)
    inside = (np.rint(x.numpy() / 0.1) >= -8) & (np.rint(x.numpy() / 0.1) <= 7)
    expected = np.where(inside, q - x.numpy() / np.float32(0.1), q).sum()
    assert scale.grad is not None and np.isclose(scale.grad.item(), expected, rtol=1e-5)


def test_fake_quantize_module_lsq_parameters_and_observer() -> None:
    spec = QuantizationSpec(dtype="int4", granularity={"type": "per_channel", "axis": 0}, learnable_scale=True)
    fq = FakeQuantize(spec, QLayout(axis=0), (3, 4), is_weight=True, name="w")
    assert isinstance(fq.scale, torch.nn.Parameter)
    w = torch.randn(3, 4, requires_grad=True)
    fq.enable_observer(True)
    fq(w).pow(2).sum().backward()
    ref = numerics.fake_quantize(w.detach().numpy(), fq.qparams().scale, fq.qparams().zero_point, QDType.INT4,
                                 QLayout(axis=0))
    assert np.array_equal(fq.fake_quant(w).detach().numpy(), ref)
    assert w.grad is not None and fq.scale.grad is not None and fq.scale.grad.shape == (3,)
    before = fq.scale
    fq.set_qparams(QParams(np.full(3, 0.5, np.float32), np.zeros(3, np.int32)))
    assert fq.scale is before  # optimizer keeps its reference
