"""A small CNN trained on scikit-learn's bundled 8x8 digits (no download), deterministic and CPU-fast.

It has Conv-BN-ReLU blocks, a residual Add, pooling and a Linear head so quantization paths for
BatchNorm folding and Add are exercised by a model that actually has an accuracy to lose.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "DigitsCNN",
    "build_digits_cnn",
    "factory",
    "load_digits_data",
    "train_digits_cnn",
    "trained_digits_cnn",
]

logger = logging.getLogger(__name__)


def load_digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed train/test split of sklearn digits: float32 NCHW [N,1,8,8] in [0,1] and int64 labels.

    Split is ``train_test_split(test_size=0.3, random_state=0, stratify=y)`` (1257 train / 540 test).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = (ds.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = ds.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return (np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual Conv-BN block (Add), max-pool, global average pool and a Linear head."""

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B,10] for images [B,1,8,8]."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + x)  # residual Add
        x = self.pool(x)
        x = self.relu3(self.conv3(x))
        x = x.mean(dim=(2, 3))  # global average pool (exports as one ReduceMean)
        return self.fc(x)


def build_digits_cnn(seed: int = 0) -> DigitsCNN:
    """A freshly initialised DigitsCNN with weights drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return DigitsCNN()


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on numpy data."""
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train_digits_cnn(epochs: int = 15, seed: int = 0, batch_size: int = 32, lr: float = 3e-3) -> tuple[DigitsCNN, float]:
    """Train deterministically (fixed seed, deterministic algorithms, single thread) and return (eval model, test acc).

    Takes about 1-3 s on CPU; two calls with the same arguments give bit-identical weights.
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # reductions are then reproducible across runs
    try:
        x_tr, y_tr, x_te, y_te = load_digits_data()
        model = build_digits_cnn(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        loss_fn = nn.CrossEntropyLoss()
        xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), batch_size):
                idx = perm[i : i + batch_size]
                opt.zero_grad()
                loss_fn(model(xt[idx]), yt[idx]).backward()
                opt.step()
            sched.step()
        model.eval()
        acc = _accuracy(model, x_te, y_te)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    logger.info("digits CNN: %d epochs, test accuracy %.4f", epochs, acc)
    return model, acc


def trained_digits_cnn(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> tuple[DigitsCNN, float]:
    """Trained model, reusing a state_dict cached in ``cache_dir`` (default $QDQ_CACHE_DIR or ~/.cache/qdq).

    The cache never lives in the repository; delete the file to retrain.
    """
    root = Path(cache_dir or os.environ.get("QDQ_CACHE_DIR") or Path.home() / ".cache" / "qdq")
    path = root / f"digits_cnn_seed{seed}.pt"
    if path.is_file():
        try:
            model = build_digits_cnn(seed)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            model.eval()
            _, _, x_te, y_te = load_digits_data()
            return model, _accuracy(model, x_te, y_te)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:  # stale/corrupt cache
            logger.warning("ignoring digits cache %s: %s", path, exc)
    model, acc = train_digits_cnn(seed=seed)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not cache digits model in %s: %s", root, exc)
    return model, acc


def factory() -> tuple[DigitsCNN, tuple[torch.Tensor]]:
    """CLI entry point (``qdq export --model models.digits:factory``): trained model and a [1,1,8,8] example."""
    model, _ = trained_digits_cnn()
    _, _, x_te, _ = load_digits_data()
    return model, (torch.from_numpy(x_te[:1].copy()),)
