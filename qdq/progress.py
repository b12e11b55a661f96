"""Progress bars (tqdm on stderr) that the CLI's --quiet and ``progress=False`` silence."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, total: int | None = None, desc: str = "", disable: bool = False,
                 **kwargs: Any) -> Iterator[T]:
    """Iterate ``items`` with a progress bar unless ``disable``."""
    if disable:
        yield from items
        return
    with tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, **kwargs) as bar:
        yield from bar
