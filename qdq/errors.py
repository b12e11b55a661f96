"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

__all__ = ["BackendError", "ConfigError", "DataError", "ModelError", "QdqError", "first_line"]


class QdqError(Exception):
    """Base class for errors a user can act on; the CLI prints them as one line."""

    exit_code = 1


class ConfigError(QdqError, ValueError):
    """A bad config key, value, op name or op type (CLI exit code 2)."""

    exit_code = 2


class ModelError(QdqError):
    """A malformed or unsupported model."""


class DataError(QdqError):
    """Calibration or evaluation data that cannot be used (empty, NaN/Inf, wrong shape)."""


class BackendError(QdqError):
    """The quantized model uses something the chosen backend cannot run."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            text = f"{type(exc).__name__}: {line.strip()}" if with_type else line.strip()
            return text[:300]
    return type(exc).__name__
