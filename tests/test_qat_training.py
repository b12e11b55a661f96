"""QAT with the torch mirror recovers the accuracy int4 PTQ loses (digits CNN; scripts/qat_digits.py has the table)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qdq.calibration.runner import make_session
from qdq.config import QuantizerConfig
from qdq.qat import QATQuantizer
from qdq.quantizer import Quantizer

CONFIG = {"global_config": {"op_state_spec": {"weight": {"dtype": "int4", "granularity": "per_channel"}},
                            "op_input_spec": {"*": {"dtype": "int8"}}, "op_output_spec": {"*": {"dtype": "int8"}}}}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Single-threaded torch: reductions, hence the training trajectory, are reproducible."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float((make_session(model, level="none").run(None, {"x": x})[0].argmax(1) == y).mean())


def test_qat_recovers_int4_weight_accuracy(digits_onnx: Path, digits_data, tmp_path: Path, one_thread: None) -> None:
    from models.digits import trained_digits_cnn

    x_tr, y_tr, x_te, y_te = digits_data
    fp32_model, fp32_acc = trained_digits_cnn()
    config = QuantizerConfig.from_dict(CONFIG)
    calib = [x_tr[i:i + 32] for i in range(0, 512, 32)]

    onnx_q = Quantizer(digits_onnx, config)
    prepared = onnx_q.prepare(calib[0])
    with onnx_q.calibration_mode():
        for batch in calib:
            prepared(batch)
    ptq_acc = _accuracy(onnx_q.qdq_model(), x_te, y_te)

    torch.manual_seed(0)
    qat = QATQuantizer(copy.deepcopy(fp32_model), config)  # the torch model itself: exported inside prepare
    qmodel = qat.prepare(torch.from_numpy(calib[0]))
    with qat.calibration_mode():
        for batch in calib:
            qmodel(torch.from_numpy(batch))
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-3)
    epochs, steps_per_epoch = 6, -(-len(x_tr) // 32)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    qmodel.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 32):
            idx = perm[i:i + 32]
            torch.nn.functional.cross_entropy(qmodel(xt[idx]), yt[idx]).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            qat.step()
    qmodel.eval()
    with torch.no_grad():
        mirror_acc = float((qmodel(xt.new_tensor(x_te)).argmax(1).numpy() == y_te).mean())
    qat_acc = _accuracy(qat.export(tmp_path / "digits_qat.onnx"), x_te, y_te)

    assert qat_acc == mirror_acc  # the exported QDQ model is the trained mirror
    assert fp32_acc - ptq_acc > 0.005  # int4 PTQ loses accuracy ...
    assert qat_acc >= ptq_acc + 0.03  # ... QAT improves over PTQ ...
    assert fp32_acc - qat_acc <= 0.005 + 1e-9  # ... to within 0.5 point of FP32
