"""Progress bars (tqdm on stderr) that the CLI's --quiet and ``progress=False`` silence."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["bar_was_drawn", "progress_bar"]

T = TypeVar("T")
_drawn = False  # a bar was shown in this process (an interrupt may leave its line unfinished)


def bar_was_drawn() -> bool:
    """True once any progress bar was shown (the CLI then starts its interrupt message on a fresh line)."""
    return _drawn


def progress_bar(items: Iterable[T], *, total: int | None = None, desc: str = "", disable: bool = False,
                 **kwargs: Any) -> Iterator[T]:
    """Iterate ``items`` with a progress bar unless ``disable``."""
    global _drawn
    if disable:
        yield from items
        return
    _drawn = True
    with tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, **kwargs) as bar:
        yield from bar
