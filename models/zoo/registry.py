"""The zoo's registry: one :class:`ZooModel` per architecture, registered by name (leaf module).

Each entry builds a seeded torch module, exports it to ONNX the way its real-world counterpart is
usually shipped (static batch, dynamic sequence, float16, opset 11, ...) and draws calibration /
evaluation data of the dtypes and shapes that ONNX file declares.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ZOO", "ZooModel", "get", "register"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One zoo architecture.

    ``build()`` returns the seeded eval-mode torch module; ``export(path)`` writes its ONNX file and
    returns the path; ``data(n, seed)`` returns ``{input name: array}`` with ``n`` samples on axis 0,
    in the dtype the ONNX file declares. ``stresses`` says which placement/runtime case it covers.
    """

    name: str
    stresses: str
    build: Callable[[], Any]
    export: Callable[[Path], Path]
    data: Callable[[int, int], dict[str, np.ndarray]]
    integer_inputs: tuple[str, ...] = ()


ZOO: dict[str, ZooModel] = {}


def register(model: ZooModel) -> ZooModel:
    """Add ``model`` to :data:`ZOO`; a second entry with the same name is a bug."""
    if model.name in ZOO:
        raise ValueError(f"zoo model '{model.name}' is registered twice")
    ZOO[model.name] = model
    return model


def get(name: str) -> ZooModel:
    """The zoo entry called ``name``."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model '{name}'; choose one of {', '.join(ZOO)}") from None
