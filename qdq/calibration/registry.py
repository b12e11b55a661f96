"""The qparams-calculator name registry: name -> class.

A leaf module (imports nothing of qdq), so configuration code (``qdq.spec``) can check names
without importing the calculators, and the calculators register themselves by importing it
(``@QParamsCalculatorBase.register("name")``); the registry never imports them. The built-in
calculators are registered when ``qdq.calibration`` is imported (``import qdq`` does that).
"""

from __future__ import annotations

import difflib
from typing import Any

__all__ = ["DuplicateCalculatorError", "add", "close_matches", "get", "names"]

_CALCULATORS: dict[str, type[Any]] = {}


class DuplicateCalculatorError(ValueError):
    """A different class is already registered under that name."""


def add(name: str, klass: type[Any]) -> None:
    """Register ``klass`` as ``name``; re-registering the same class (a module reloaded) is allowed."""
    existing = _CALCULATORS.get(name)
    if existing is not None and existing.__qualname__ != klass.__qualname__:
        raise DuplicateCalculatorError(
            f"a calculator named '{name}' is already registered ({existing.__qualname__}); pick another name")
    _CALCULATORS[name] = klass


def get(name: str) -> type[Any] | None:
    """The class registered as ``name``, or None."""
    return _CALCULATORS.get(name)


def names() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_CALCULATORS)


def close_matches(name: str) -> list[str]:
    """Up to three registered names close to ``name`` (for 'did you mean' hints)."""
    return difflib.get_close_matches(name, _CALCULATORS, n=3)
