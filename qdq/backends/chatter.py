"""Converter chatter (banners, tqdm bars, import-time warnings) moved from the terminal to qdq's debug log.

coremltools warns at import that Linux cannot run models and draws tqdm bars on stderr; coreai-torch
prints a banner and bars on stdout; torchao logs the CUDA kernels it cannot load. None of it is
actionable for a qdq user, and all of it breaks ``--quiet``. Errors still propagate: only text and
sub-ERROR log records are captured.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

__all__ = ["quiet", "quiet_native"]

logger = logging.getLogger("qdq.backends")


@contextlib.contextmanager
def quiet(*loggers: str, stdout: bool = False, stderr: bool = True, python_warnings: bool = True) -> Iterator[None]:
    """Within the block: ``loggers`` log ERROR and above only, ``stdout`` / ``stderr`` text (Python-level) and
    Python warnings are captured; what was captured is logged at debug level afterwards."""
    chatter = io.StringIO()
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            if python_warnings:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            if stdout:
                stack.enter_context(contextlib.redirect_stdout(chatter))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(chatter))
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        text = chatter.getvalue().strip()
        if text:
            logger.debug("converter output: %s", " | ".join(line for line in text.splitlines() if line.strip()))


@contextlib.contextmanager
def quiet_native(fd: int = 2) -> Iterator[None]:
    """Capture what native code writes to file descriptor ``fd`` (stderr) within the block, e.g. the Core AI
    runtime's "Loading function" line; it is logged at debug level afterwards."""
    try:
        saved = os.dup(fd)
    except OSError:  # no such descriptor (embedded interpreters): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        (sys.stderr if fd == 2 else sys.stdout).flush()
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                logger.debug("native output: %s", " | ".join(line for line in text.splitlines() if line.strip()))
