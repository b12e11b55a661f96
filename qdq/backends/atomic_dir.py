"""Write a directory artifact (``.mlpackage``, ``.aimodel``) atomically: built beside it, renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qdq.errors import BackendError, first_line

__all__ = ["write_dir_atomically"]


def write_dir_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """``write(staged)`` builds the artifact at a temporary path in ``path``'s folder, which then replaces ``path``.

    An existing artifact at ``path`` is replaced only once the new one is complete, and restored if the swap
    fails; a failing ``write`` leaves ``path`` untouched and no temporary file behind.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BackendError(f"cannot write {path}: folder {parent} does not exist; create it or choose another path")
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise BackendError(f"cannot write {path}: folder {parent} is not writable ({first_line(exc)})") from exc
    try:
        staged = tmp_dir / path.name
        write(staged)
        if not staged.exists():
            raise BackendError(f"writing {path.name} produced nothing")
        backup = None
        if path.exists() or path.is_symlink():
            backup = tmp_dir / (path.name + ".previous")
            os.replace(path, backup)
        try:
            os.replace(staged, path)
        except OSError:
            if backup is not None:
                os.replace(backup, path)
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
