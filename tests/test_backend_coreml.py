"""Core ML for real: prepared QDQ -> torch program (quantized_decomposed ops) -> coremltools -> .mlpackage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

import qdq
from qdq.backends.coreml import inspect
from qdq.errors import BackendError
from qdq.qat.parity import code_parity, summarize, unexplained
from qdq.quantizer import Quantizer


def _calibrated(path: Path, config: str, x: np.ndarray) -> Quantizer:
    q = Quantizer(path, config)
    prepared = q.prepare(x[:64])
    with q.calibration_mode():
        for i in range(0, 256, 64):
            prepared(x[i:i + 64])
    return q


@pytest.mark.parametrize("preset", ["int8", "w8"])
def test_mlpackage_weights_are_int8_constexpr(digits_onnx: Path, digits_data, tmp_path: Path, preset: str) -> None:
    x_tr, _, x_te, _ = digits_data
    q = _calibrated(digits_onnx, preset, x_tr)
    final = q.finalize("coreml")
    info = inspect(qdq.save(final, tmp_path / "m.mlpackage"))
    weights = [i for i in final.module.infos.values() if i.kind == "weight"]
    assert info["ops"].get("constexpr_affine_dequantize") == len(weights) == 4
    assert info["weight_dtypes"] == {"INT8": 4} and info["float_weights"] == []
    activations = [i for i in final.module.infos.values() if i.kind == "activation"]
    assert info["ops"].get("quantize", 0) == len(activations) == (7 if preset == "int8" else 0)  # logits float
    assert not any("fake" in op for op in info["ops"])
    parity = code_parity(final.module, q.qdq_model(), x_te[:64])
    assert not unexplained(parity) and summarize(parity)[0] >= 0.999, summarize(parity)


def test_refusals_before_calibration(digits_onnx: Path) -> None:
    batch = [np.zeros((2, 1, 8, 8), np.float32)]
    with pytest.raises(BackendError, match="coreml does not support float8_e4m3fn"):
        qdq.quantize(digits_onnx, "fp8", batch, backend="coreml")
    with pytest.raises(BackendError, match="iOS18"):
        qdq.quantize(digits_onnx, "w4", batch, backend="coreml")


@pytest.mark.parametrize(("preset", "dtype"), [("w4", "INT4"), ("int8", "INT8")])
def test_ios18_blockwise_constexpr_keeps_declared_bits(digits_onnx: Path, digits_data, tmp_path: Path,
                                                       preset: str, dtype: str) -> None:
    """iOS18 stores weights as constexpr_blockwise_shift_scale: w4 Conv weights stay one INT4 op each
    (qdq's MIL pass folds the 2-D blocked view back to rank 4); int8 weights with small codes stay INT8."""
    x_tr, _, x_te, _ = digits_data
    q = _calibrated(digits_onnx, preset, x_tr)
    final = q.finalize("coreml", deployment_target="iOS18")
    info = inspect(qdq.save(final, tmp_path / "m.mlpackage"))
    assert info["ops"].get("constexpr_blockwise_shift_scale") == 4
    assert info["weight_dtypes"] == {dtype: 4} and info["float_weights"] == []
    assert sorted(len(w["shape"]) for w in info["weights"]) == [2, 4, 4, 4]  # one rank-4 constexpr per Conv
    parity = code_parity(final.module, q.qdq_model(), x_te[:64])
    assert not unexplained(parity) and summarize(parity)[0] >= 0.999, summarize(parity)


def test_w4_partial_blocks_are_reblocked_or_kept_at_int8(tmp_path: Path) -> None:
    """ONNX allows a partial last block, Core ML does not: a 48-wide axis in blocks of 32 is re-blocked at 16
    (still INT4), a 36-wide one (no block of 8+ divides it with 32) is kept at int8 per channel; both say why."""
    from qdq.backends.whole_blocks import needs_whole_blocks
    from qdq.torch_export import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(48, 36), torch.nn.ReLU(), torch.nn.Linear(36, 8)).eval()
    path = export(net, (torch.randn(2, 48),), tmp_path / "mlp.onnx")
    x = torch.randn(64, 48).numpy()
    q = Quantizer(path, "w4")
    q.prepare(x[:8])
    final = q.finalize("coreml", deployment_target="iOS18")
    notes = {n.tensor: n for n in final.notes}
    assert len(notes) == 2, final.notes
    first, second = (notes[k] for k in sorted(notes))  # 0.weight, 2.weight
    assert first.action.startswith("re-blocked at 16") and "not a multiple of block size 32" in first.reason
    assert second.action == "kept at int8 per channel" and "36" in second.reason
    info = inspect(qdq.save(final, tmp_path / "m.mlpackage"))
    assert info["weight_dtypes"] == {"INT4": 1, "INT8": 1} and info["float_weights"] == []
    parity = code_parity(final.module, final.onnx_model, x)
    assert not unexplained(parity) and summarize(parity)[0] >= 0.999, summarize(parity)
    # still close to the float network
    got, want = final.run(x)[0], net(torch.from_numpy(x)).detach().numpy()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99
    assert needs_whole_blocks(48, 32) and not needs_whole_blocks(16, 32) and not needs_whole_blocks(64, 32)
