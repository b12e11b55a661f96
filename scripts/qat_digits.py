"""FP32 vs PTQ vs QAT on the digits CNN with int4 per-channel weights and int8 activations.

One QuantizerConfig drives both sides: the ONNX Quantizer (PTQ, onnxruntime calibration) and the
torch mirror (QAT). Every accuracy of a quantized model is measured by onnxruntime on the exported
QDQ model: "prepared" runs the QDQ graph as written (reference semantics), "finalized" is
``finalize_model(..., "onnxruntime")`` run with all onnxruntime optimizations (integer kernels).

    python scripts/qat_digits.py [--epochs 6] [--lr 1e-3] [--seeds 0,1,2]

Takes about 30 s on one CPU core.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.digits import load_digits_data, trained_digits_cnn
from qdq.config import QuantizerConfig
from qdq.qat import QATQuantizer
from qdq.quantizer import Quantizer, finalize_model
from qdq.session import make_session
from qdq.torch_export import export

logger = logging.getLogger("qat_digits")

CONFIG = {
    "global_config": {
        "op_state_spec": {"weight": {"dtype": "int4", "granularity": "per_channel"}},
        "op_input_spec": {"*": {"dtype": "int8"}},
        "op_output_spec": {"*": {"dtype": "int8"}},
    },
}
CALIB_SAMPLES = 512
BATCH = 32


def onnx_accuracy(model: Any, x: np.ndarray, y: np.ndarray, level: str) -> float:
    """Top-1 accuracy of an ONNX model in onnxruntime at optimization ``level``."""
    out = make_session(model, level=level).run(None, {"x": x})[0]
    return float((out.argmax(1) == y).mean())


def calibration_batches(x: np.ndarray) -> list[np.ndarray]:
    return [x[i : i + BATCH] for i in range(0, CALIB_SAMPLES, BATCH)]


def ptq(float_onnx: Path, config: QuantizerConfig, x_tr: np.ndarray) -> Quantizer:
    """The ONNX side: Quantizer + onnxruntime calibration on the first CALIB_SAMPLES training images."""
    q = Quantizer(float_onnx, config)
    prepared = q.prepare(x_tr[:BATCH])
    with q.calibration_mode():
        for batch in calibration_batches(x_tr):
            prepared(batch)
    return q


def qat(model: nn.Module, config: QuantizerConfig, data: tuple[np.ndarray, ...], *, epochs: int, lr: float,
        seed: int, start_from: Quantizer | None = None) -> QATQuantizer:
    """The torch mirror: prepare, calibrate (or load the ONNX PTQ qparams), train, return the quantizer."""
    x_tr, y_tr, _, _ = data
    torch.manual_seed(seed)
    quantizer = QATQuantizer(copy.deepcopy(model), config)
    qmodel = quantizer.prepare(torch.from_numpy(x_tr[:BATCH]))
    if start_from is None:
        with quantizer.calibration_mode():
            for batch in calibration_batches(x_tr):
                qmodel(torch.from_numpy(batch))
    else:
        quantizer.load_qparams(start_from)
    opt = torch.optim.Adam(qmodel.parameters(), lr=lr)
    steps = epochs * -(-len(x_tr) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    loss_fn = nn.CrossEntropyLoss()
    qmodel.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            loss = loss_fn(qmodel(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            quantizer.step()
    qmodel.eval()
    return quantizer


def mirror_accuracy(quantizer: QATQuantizer, x: np.ndarray, y: np.ndarray) -> float:
    model = quantizer.model
    assert model is not None
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated QAT seeds (mean and range shown)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(1)  # reproducible reductions
    start = time.time()

    fp32_model, fp32_acc = trained_digits_cnn()
    data = load_digits_data()
    x_tr, _, x_te, y_te = data
    config = QuantizerConfig.from_dict(CONFIG)
    rows: dict[str, dict[str, list[float]]] = {"FP32 (torch)": {"prepared": [fp32_acc]}}
    with tempfile.TemporaryDirectory() as tmp:
        float_onnx = export(fp32_model, (torch.from_numpy(x_tr[:2]),), Path(tmp) / "digits.onnx")
        rows["FP32 (onnxruntime)"] = {"prepared": [onnx_accuracy(float_onnx, x_te, y_te, "none")]}
        onnx_q = ptq(float_onnx, config, x_tr)
        rows["PTQ (ONNX Quantizer)"] = {"prepared": [onnx_accuracy(onnx_q.qdq_model(), x_te, y_te, "none")],
                                        "finalized": [onnx_accuracy(onnx_q.finalize(), x_te, y_te, "all")]}
        variants: dict[str, dict[str, Any]] = {
            "QAT (calibrated in torch)": {"config": config},
            "QAT from ONNX PTQ qparams (load_qparams)": {"config": config, "start_from": onnx_q},
            "QAT with LSQ weight scales": {
                "config": QuantizerConfig.from_dict({**CONFIG, "qat_schedule": {"learnable_scale": "weights"}})},
        }
        for name, kw in variants.items():
            row: dict[str, list[float]] = {"mirror": [], "prepared": [], "finalized": []}
            for seed in seeds:
                quantizer = qat(fp32_model, kw["config"], data, epochs=args.epochs, lr=args.lr, seed=seed,
                                start_from=kw.get("start_from"))
                path = quantizer.export(Path(tmp) / "qat.onnx")
                row["mirror"].append(mirror_accuracy(quantizer, x_te, y_te))
                row["prepared"].append(onnx_accuracy(path, x_te, y_te, "none"))
                row["finalized"].append(onnx_accuracy(finalize_model(path, "onnxruntime"), x_te, y_te, "all"))
            rows[name] = row

    print(f"digits CNN, int4 per-channel weights / int8 activations; top-1 % on {len(y_te)} test images")
    print(f"calibration: {CALIB_SAMPLES} training images; QAT: {args.epochs} epochs, Adam lr {args.lr}, cosine; "
          f"seeds {seeds}: mean (min-max)")
    cols = [("torch mirror", "mirror", 22), ("QDQ model (ORT)", "prepared", 22), ("finalized (ORT)", "finalized", 22)]
    header = f"| {'model':42s} | " + " | ".join(f"{c:>{w}s}" for c, _, w in cols) + f" | {'vs FP32':>7s} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, r in rows.items():
        cells = []
        for _, key, width in cols:
            v = r.get(key)
            if not v:
                cells.append(f"{'-':>{width}s}")
            elif len(v) == 1:
                cells.append(f"{100 * v[0]:{width}.2f}")
            else:
                cells.append(f"{100 * np.mean(v):.2f} ({100 * min(v):.2f}-{100 * max(v):.2f})".rjust(width))
        delta = 100 * (float(np.mean(r["prepared"])) - fp32_acc)
        print(f"| {name:42s} | " + " | ".join(cells) + f" | {delta:+7.2f} |")
    print(f"({time.time() - start:.1f} s)")
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
