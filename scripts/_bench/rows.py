"""Rows of the benchmark (tool and settings), their labels, and the calibration images they share."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


MEAN, STD = 0.498, 0.502
THREADS = 2
BATCH = 16  # calibration batch size for every tool (qdq's CLI default)
EVAL_BATCH = 32

#: row name -> (tool, settings)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "ort-minmax-s8s8": ("ort", {"method": "MinMax", "activation": "QInt8"}),
    "ort-minmax-u8s8": ("ort", {"method": "MinMax", "activation": "QUInt8"}),
    "ort-percentile-u8s8": ("ort", {"method": "Percentile", "activation": "QUInt8"}),
    "ort-entropy-u8s8": ("ort", {"method": "Entropy", "activation": "QUInt8"}),
    "coreai-moving_average": ("coreai", {"config": "moving_average"}),
    "coreai-global_minmax": ("coreai", {"config": "global_minmax"}),
    "coreai-fp8": ("coreai", {"config": "fp8"}),
    "qdq-moving_average": ("qdq", {"args": ["--preset", "int8"]}),
    "qdq-global_minmax": ("qdq", {"args": ["--preset", "int8-global-minmax"]}),
    "qdq-fp8": ("qdq", {"args": ["--preset", "fp8"]}),
    "qdq-percentile": ("qdq", {"args": ["--preset", "int8", "--calibrator", "percentile"]}),
    "qdq-entropy": ("qdq", {"args": ["--preset", "int8", "--calibrator", "entropy"]}),
    "qdq-mse": ("qdq", {"args": ["--preset", "int8", "--calibrator", "mse"]}),
}
LABELS = {
    "ort-minmax-s8s8": "onnxruntime MinMax S8S8",
    "ort-minmax-u8s8": "onnxruntime MinMax U8S8",
    "ort-percentile-u8s8": "onnxruntime Percentile U8S8",
    "ort-entropy-u8s8": "onnxruntime Entropy U8S8",
    "coreai-moving_average": "coreai_opt W8A8 moving_average",
    "coreai-global_minmax": "coreai_opt W8A8 global_minmax",
    "coreai-fp8": "coreai_opt FP8 e4m3 global_minmax",
    "qdq-moving_average": "qdq W8A8 moving_average (`--preset int8`)",
    "qdq-global_minmax": "qdq W8A8 global_minmax (`--preset int8-global-minmax`)",
    "qdq-fp8": "qdq FP8 e4m3 global_minmax (`--preset fp8`)",
    "qdq-percentile": "qdq W8A8 percentile (`--calibrator percentile`)",
    "qdq-entropy": "qdq W8A8 entropy (`--calibrator entropy`)",
    "qdq-mse": "qdq W8A8 mse (`--calibrator mse`)",
}
#: onnxruntime's histogram calibrators keep every activation: ~62 MB per sample on this model
ORT_HISTOGRAM_BYTES_PER_SAMPLE = 64e6
#: Ops that, left in onnxruntime's optimized graph, are float convolutions / matrix products
#: (any domain: the NCHWc and fused kernels are float too).
FLOAT_CONV_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


# ----------------------------------------------------------------------------- data


def sample_dir() -> Path:
    from models import efficientnet as eff

    root = eff.imagenet_sample_dir()
    if root is None:
        sys.exit("bench_vs_ort: ../shared/data/imagenet-sample not found (set QDQ_IMAGENET_SAMPLE)")
    return root / "images"


def calib_image_count() -> int:
    """How many distinct calibration images the sample has (the first 256 by name)."""
    from models import efficientnet as eff

    return len(eff.list_imagenet_sample("calib"))


def calib_folder(work: Path, n: int) -> Path:
    """A folder of symlinks to the first ``n`` calibration images (the 256 repeated when n > 256), in name order."""
    from models import efficientnet as eff

    files = eff.list_imagenet_sample("calib")
    folder = work / f"calib-{n}"
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        src = files[i % len(files)]
        (folder / f"{i:05d}_{src.name}").symlink_to(src)
    return folder


def image_batches(folder: Path, batch: int) -> Iterator[np.ndarray]:
    from PIL import Image

    from models.efficientnet import preprocess

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for i in range(0, len(files), batch):
        out = []
        for f in files[i:i + batch]:
            with Image.open(f) as img:
                out.append(preprocess(img))
        yield np.stack(out)


@dataclasses.dataclass
class Row:
    """One row of the results table (NaN where not measured)."""

    name: str
    seconds: float = math.nan
    peak_mb: float = math.nan
    top1: float = math.nan
    agreement: float = math.nan
    sqnr: float = math.nan
    speed_b1: float = math.nan
    speed_b32: float = math.nan
    float_convs: float = math.nan
    note: str = ""
