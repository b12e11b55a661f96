"""The seed article's PTQ experiment as a table: FP32 vs W8A8 moving_average / global_minmax vs FP8.

Used by ``qdq demo`` (digits CNN, plus EfficientNet-Lite0 when the ImageNet sample is present)
and by ``scripts/ptq_table.py``. Each row is quantized by :func:`qdq.quantize`, the same code as
``qdq quantize``, and evaluated as a finalized onnxruntime model (real integer kernels), i.e. what
ships.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qdq.metrics import agreement_estimate, sqnr_db
from qdq.model_io import load_model
from qdq.oneshot import quantize
from qdq.progress import progress_bar
from qdq.session import make_session

__all__ = ["APPLE_CASES", "SEED_CONFIGS", "PTQRow", "apple_table", "format_table", "ptq_rows", "run_demo"]

#: The seed article's three configs, by row name.
SEED_CONFIGS: dict[str, str] = {
    "W8A8 moving_average": "int8",
    "W8A8 global_minmax": "int8-global-minmax",
    "FP8 e4m3 global_minmax": "fp8",
}


@dataclasses.dataclass
class PTQRow:
    name: str
    top1: float
    agreement: float
    sqnr_db: float
    size_mb: float
    seconds: float
    #: top-1 agreement to expect on new images (:func:`qdq.metrics.expected_agreement`: every FP32 margin
    #: against every observed error; the counted one moves in steps of one image and hinges on near-ties)
    expected_agreement: float = 100.0
    #: 90 % range of the agreement counted on these images under the same error level
    #: (:func:`qdq.metrics.agreement_interval`)
    agreement_range: tuple[float, float] = (100.0, 100.0)


def _logits(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    session = make_session(load_model(model))
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def ptq_rows(fp32_path: str | Path, calib: Callable[[], Iterable[np.ndarray]], eval_x: np.ndarray,
             eval_y: np.ndarray, *, configs: dict[str, Any] | None = None, batch_size: int = 32,
             out_dir: str | Path | None = None, progress: bool = True) -> list[PTQRow]:
    """Quantize ``fp32_path`` with each config (calibrating on ``calib()``), evaluate on ``eval_x``."""
    configs = SEED_CONFIGS if configs is None else configs
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="qdq-demo-"))
    ref = _logits(fp32_path, eval_x, batch_size)
    rows = [PTQRow("FP32", float((ref.argmax(-1) == eval_y).mean() * 100), 100.0, float("inf"),
                   Path(fp32_path).stat().st_size / 1e6, 0.0)]
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        path = out_dir / f"{name.split()[0].lower()}-{len(rows)}.onnx"
        # the same one path as `qdq quantize` and qdq.quantize (bias correction, checks, atomic save)
        quantize(fp32_path, cfg, progress_bar(calib(), desc=name, disable=not progress), output=path,
                 progress=False)
        seconds = time.perf_counter() - t0
        logits = _logits(path, eval_x, batch_size)
        rows.append(PTQRow(name, float((logits.argmax(-1) == eval_y).mean() * 100),
                           float((logits.argmax(-1) == ref.argmax(-1)).mean() * 100), sqnr_db(ref, logits),
                           path.stat().st_size / 1e6, seconds, *agreement_estimate(ref, logits)))
    return rows


def format_table(rows: list[PTQRow], title: str) -> str:
    """Markdown table of ``rows``."""
    lines = [f"### {title}", "",
             "| config | top-1 % | agreement with FP32 % | logits SQNR dB | file MB | quantize s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sq = "—" if r.sqnr_db == float("inf") else f"{r.sqnr_db:.1f}"
        sec = "—" if r.name == "FP32" else f"{r.seconds:.1f}"
        lines.append(f"| {r.name} | {r.top1:.2f} | {r.agreement:.2f} | {sq} | {r.size_mb:.2f} | {sec} |")
    return "\n".join(lines)


def _digits(work: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    import torch

    from models.digits import load_digits_data, trained_digits_cnn
    from qdq.torch_export import export

    path = work / "digits.onnx"
    x_tr, _, x_te, y_te = load_digits_data()
    if not path.exists():
        model, _ = trained_digits_cnn()
        export(model, (torch.from_numpy(x_tr[:2]),), path)
    return path, x_tr, x_te, y_te


def digits_table(work: Path, progress: bool = True) -> str:
    path, x_tr, x_te, y_te = _digits(work)
    rows = ptq_rows(path, lambda: (x_tr[i:i + 64] for i in range(0, 512, 64)), x_te, y_te, out_dir=work,
                    progress=progress)
    return format_table(rows, f"Digits CNN (scikit-learn digits: calibrate on 512 train images, evaluate on {len(x_te)} test images)")


#: The demo's Core ML / Core AI rows: (backend, preset, conversion options).
APPLE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("coreml", "int8", {"deployment_target": "iOS17"}), ("coreml", "w4", {"deployment_target": "iOS18"}),
    ("coreai", "int8", {}), ("coreai", "fp8", {}),
]


def apple_table(work: Path) -> str:
    """The digits CNN through coremltools and coreai-torch (the converters that are installed), or why not."""
    import importlib.util

    from qdq.backend_eval import backend_rows, format_backend_table

    have = {"coreml": importlib.util.find_spec("coremltools") is not None,
            "coreai": importlib.util.find_spec("coreai_torch") is not None}
    cases = [c for c in APPLE_CASES if have[c[0]]]
    missing = [b for b, ok in have.items() if not ok]
    skipped = f"(skipped {', '.join(missing)}: pip install 'qdq[{','.join(missing)}]')" if missing else ""
    if not cases:
        return "\n(Core ML / Core AI rows " + skipped + ")"
    path, x_tr, x_te, y_te = _digits(work)
    rows = backend_rows(path, lambda: (x_tr[i:i + 64] for i in range(0, 512, 64)), x_te, y_te, cases, work)
    table = format_backend_table(rows, "Digits CNN on Core ML / Core AI (converted by coremltools / coreai-torch; "
                                       "Core AI accuracy from its Linux runtime)")
    return "\n" + table + ("\n" + skipped if skipped else "")


def efficientnet_table(work: Path, images: str | Path | None = None, progress: bool = True,
                       batch_size: int = 32) -> str | None:
    """EfficientNet-Lite0 table on the ImageNet sample (first 256 calibrate, rest evaluate); None if absent."""
    import os

    from models import efficientnet as eff
    from qdq.torch_export import export

    if images is not None:
        os.environ["QDQ_IMAGENET_SAMPLE"] = str(images)
    if eff.imagenet_sample_dir() is None:
        return None
    model, example = eff.factory()
    path = export(model, example, work / "efficientnet_lite0.onnx")
    calib_x, _ = eff.load_imagenet_sample("calib")
    eval_x, eval_y = eff.load_imagenet_sample("eval")
    rows = ptq_rows(path, lambda: (calib_x[i:i + batch_size] for i in range(0, len(calib_x), batch_size)),
                    eval_x, eval_y, out_dir=work, progress=progress, batch_size=batch_size)
    return format_table(rows, f"EfficientNet-Lite0 (ImageNet sample: calibrate on {len(calib_x)}, evaluate on {len(eval_x)})")


def run_demo(images: str | Path | None = None, efficientnet: bool = True, progress: bool = True) -> None:
    with tempfile.TemporaryDirectory(prefix="qdq-demo-") as tmp:
        work = Path(tmp)
        print(digits_table(work, progress), flush=True)
        print(apple_table(work), flush=True)
        if efficientnet:
            table = efficientnet_table(work, images, progress)
            if table is None:
                print("\n(EfficientNet-Lite0 table skipped: ../shared/data/imagenet-sample not found; pass --images DIR)")
            else:
                print("\n" + table)
