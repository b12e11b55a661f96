"""Run a saved ``.aimodel`` with the Core AI runtime (coreai-core runs on Linux too).

:class:`CoreAIRuntime` loads the asset once and runs batches synchronously (the runtime's API is async)::

    with CoreAIRuntime("m.aimodel") as rt:
        logits = rt.run({"x": batch})[0]
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from qdq.backends.chatter import quiet_native
from qdq.backends.coreai._extra import require
from qdq.errors import BackendError, DataError, first_line

__all__ = ["CoreAIRuntime", "run"]

_LIVE: weakref.WeakSet[CoreAIRuntime] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for rt in list(_LIVE):
        rt.close()


class CoreAIRuntime:
    """A loaded ``.aimodel`` function (``main`` by default); a context manager."""

    def __init__(self, path: str | os.PathLike[str], function: str = "main") -> None:
        self.path = Path(path)
        self.function = function
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: Any = None
        self._fn: Any = None
        authoring = require("coreai.authoring")
        self._ndarray = require("coreai.runtime").NDArray
        self._authoring = authoring
        self._asset: Any = None
        asset = self._load()
        summary = asset.summary()
        inputs = list(summary.function_inputs(function))
        self.input_names = [n for n, _ in inputs]
        self.input_dtypes = {n: _asset_dtype(t) for n, t in inputs}
        self.output_names = [n for n, _ in summary.function_outputs(function)]
        del summary, asset  # an asset still alive at interpreter exit can abort the process (coreai-core 1.0.0b3)

    def _load(self) -> Any:
        try:
            return self._authoring.AIModelAsset.load(self.path)
        except Exception as exc:
            raise BackendError(f"cannot load the Core AI asset {self.path}: {first_line(exc, with_type=True)}") \
                from exc

    def __enter__(self) -> Self:
        self._asset = self._load()
        _LIVE.add(self)
        self._loop = asyncio.new_event_loop()
        self._context = self._asset.executable()
        try:
            with quiet_native():  # "ODIE [default]: Loading function 'main'" on stderr
                model = self._loop.run_until_complete(self._context.__aenter__())
                self._fn = model.load_function(self.function)
        except Exception as exc:
            self.close()
            raise BackendError(f"the Core AI runtime cannot load {self.path}: {first_line(exc, with_type=True)}") \
                from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unload the model and release the asset (also done at interpreter exit for runtimes left open)."""
        _LIVE.discard(self)
        if self._loop is None:
            self._asset = None
            return
        try:
            if self._context is not None:
                self._loop.run_until_complete(self._context.__aexit__(None, None, None))
        finally:
            self._loop.close()
            self._loop = self._context = self._fn = self._asset = None
            gc.collect()

    def run(self, feeds: Mapping[str, Any] | Sequence[Any] | np.ndarray) -> list[np.ndarray]:
        """Outputs (in the asset's order) for one batch: a dict by input name, a sequence, or one array."""
        if self._loop is None or self._fn is None:
            raise BackendError("CoreAIRuntime.run() outside its 'with' block")
        if isinstance(feeds, Mapping):
            named = dict(feeds)
        else:
            values = [feeds] if isinstance(feeds, np.ndarray) else list(feeds)
            if len(values) != len(self.input_names):
                raise DataError(f"{self.path.name} takes {len(self.input_names)} inputs "
                                f"({', '.join(self.input_names)}), got {len(values)}")
            named = dict(zip(self.input_names, values))
        unknown = sorted(set(named) - set(self.input_names))
        if unknown:
            raise DataError(f"unknown input(s) {unknown} for {self.path.name}; it takes {self.input_names}")
        args = {k: self._ndarray(np.ascontiguousarray(self._as_input(k, np.asarray(v)))) for k, v in named.items()}
        try:
            out = self._loop.run_until_complete(self._fn(args))
        except Exception as exc:
            raise BackendError(f"the Core AI runtime failed on {self.path.name}: {first_line(exc, with_type=True)}") \
                from exc
        return [np.array(out[name].numpy()) for name in self.output_names]


    def _as_input(self, name: str, x: np.ndarray) -> np.ndarray:
        """``x`` in the dtype the asset declares (coreai-torch stores int64 inputs as int32: token ids, masks)."""
        want = self.input_dtypes.get(name)
        if want is None or x.dtype == want:
            return x
        if x.dtype.kind in "iub" and want.kind in "iu":
            info = np.iinfo(want)
            if x.size and (x.min() < info.min or x.max() > info.max):
                raise DataError(f"input '{name}' has values outside {want} (the asset's input type); "
                                f"got [{x.min()}, {x.max()}]")
        return x.astype(want)


def _asset_dtype(description: Any) -> np.dtype | None:
    """numpy dtype of an asset input described as e.g. ``'NDArray (Int32, 2 × 64)'`` (None if unknown)."""
    m = re.search(r"\((\w+)", str(description))
    return _ASSET_DTYPES.get(m.group(1).lower()) if m else None


_ASSET_DTYPES: dict[str, np.dtype] = {"int32": np.dtype(np.int32), "int64": np.dtype(np.int64), "int16": np.dtype(np.int16),
                 "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "float32": np.dtype(np.float32),
                 "float16": np.dtype(np.float16), "bool": np.dtype(np.bool_)}


def run(path: str | os.PathLike[str], feeds: Mapping[str, Any] | Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """Load ``path`` and run one batch (use :class:`CoreAIRuntime` for many)."""
    with CoreAIRuntime(path) as rt:
        return rt.run(feeds)
