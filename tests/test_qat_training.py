"""QAT with the torch mirror recovers the accuracy int4 PTQ loses (digits CNN; scripts/qat_digits.py has the table).

The FP32 model (trained on the machine that runs the test), the PTQ baseline and the QAT run all
depend on float rounding and seeds, so the assertions compare QAT with the FP32 and PTQ accuracy
measured in the same run, with margins that held for FP32 seeds 0-4, QAT seeds 0-3 and 1 or 2
torch threads (QDQ_TEST_SEED / QDQ_TEST_THREADS vary the QAT seed and thread count).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qdq.config import QuantizerConfig
from qdq.qat import QATQuantizer
from qdq.quantizer import Quantizer
from qdq.session import make_session

CONFIG = {"global_config": {"op_state_spec": {"weight": {"dtype": "int4", "granularity": "per_channel"}},
                            "op_input_spec": {"*": {"dtype": "int8"}}, "op_output_spec": {"*": {"dtype": "int8"}}}}


SEED = int(os.environ.get("QDQ_TEST_SEED", "0"))
THREADS = int(os.environ.get("QDQ_TEST_THREADS", "1"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Single-threaded torch by default: reductions, hence the training trajectory, are reproducible."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(prev)


def _logits(model, x: np.ndarray) -> np.ndarray:
    return make_session(model, level="none").run(None, {"x": x})[0]


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float((_logits(model, x).argmax(1) == y).mean())


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

    torch.manual_seed(SEED)
    qat = QATQuantizer(copy.deepcopy(fp32_model), config)  # the torch model itself: exported inside prepare
    qmodel = qat.prepare(torch.from_numpy(calib[0]))
    with qat.calibration_mode():
        for batch in calib:
            qmodel(torch.from_numpy(batch))
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-3)
    epochs, steps_per_epoch = 6, -(-len(x_tr) // 32)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(SEED)
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
        mirror_pred = qmodel(xt.new_tensor(x_te)).argmax(1).numpy()
    ort_logits = _logits(qat.export(tmp_path / "digits_qat.onnx"), x_te)
    qat_acc = float((ort_logits.argmax(1) == y_te).mean())

    # the exported QDQ model is the trained mirror: its logits are codes that may differ by one step
    # (float summation order), so predictions may differ only where the top two logits are within a step
    step = float(np.max(qat.qparams["linear"].scale))
    top2 = np.sort(ort_logits, axis=1)[:, -2:]
    close = top2[:, 1] - top2[:, 0] <= step * (1 + 1e-3)
    assert not ((mirror_pred != ort_logits.argmax(1)) & ~close).any()

    # QAT recovers at least half of what int4 PTQ lost, or ends within 1 % of FP32 (about two standard
    # deviations of the difference between two models on these 540 test images). Seen: PTQ lost 0.2-7 %,
    # QAT ended 0.6 % below to 0.4 % above FP32.
    gap = fp32_acc - ptq_acc
    assert fp32_acc - qat_acc <= max(gap / 2, 0.01) + 1e-9, (fp32_acc, ptq_acc, qat_acc)
