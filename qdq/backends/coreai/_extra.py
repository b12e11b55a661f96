"""Import the optional Core AI packages (coreai-torch, coreai-core) with a one-line error when missing."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from qdq.errors import BackendError

__all__ = ["INSTALL_HINT", "require"]

INSTALL_HINT = "pip install 'qdq[coreai]'"


def require(module: str) -> Any:
    """``importlib.import_module(module)``, or a BackendError naming the extra to install."""
    try:
        with warnings.catch_warnings():  # coreai-torch warns about the torch version on import
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"the Core AI backend needs coreai-torch and coreai-core ({exc.name or module} is "
                           f"missing): {INSTALL_HINT}") from None
