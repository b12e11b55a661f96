"""On-disk arrays read by sample range, never all at once: memory-mapped ``.npy`` and ``.npz`` members,
compressed ``.npz`` members decompressed front to back.

``.npy`` files and uncompressed ``.npz`` members (what ``np.save``/``np.savez`` write) are
memory-mapped; compressed members (``np.savez_compressed``) are inflated sequentially as batches
are read. The one exception is a *compressed* Fortran-ordered member with 2+ dims, which cannot be
read by rows and is loaded whole (logged).
"""

from __future__ import annotations

import logging
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from qdq.errors import DataError
from qdq.model_inputs import fmt_shape

__all__ = ["ARRAY_SUFFIXES", "Array", "MappedArray", "SingleSample", "StackedInputs", "UnbatchedInput", "UnbatchedValueError", "ZipStreamArray", "open_arrays"]

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".npz")
#: dtype kinds accepted: bool, signed/unsigned int, float.
_NUMERIC_KINDS = "biuf"


class Array(Protocol):
    """An array on disk whose samples (first axis) are read by range, never all at once."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, start: int, stop: int) -> np.ndarray: ...


class MappedArray:
    """A memory-mapped (or, rarely, in-memory) array: ranges are plain slices."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype: np.dtype = array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


class SingleSample:
    """A file holding one sample: exposed with a leading sample axis of size 1."""

    def __init__(self, inner: Array) -> None:
        self.inner = inner
        self.shape = (1, *inner.shape)
        self.dtype = inner.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.inner.shape), self.dtype)
        return self.inner.read(0, self.inner.shape[0])[None]


class StackedInputs:
    """A file of whole model inputs ``[samples, *input shape]`` for a model whose first dim is not a free batch (a
    fixed ``(16,)`` vector, a ``(3, H, W)`` image without batch axis): a range of samples reads as their rows
    joined along the model's first dim, one whole input per ``rows`` rows."""

    def __init__(self, inner: Array) -> None:
        self.inner = inner
        self.rows = inner.shape[1]
        self.shape: tuple[int, ...] = (inner.shape[0] * self.rows, *inner.shape[2:])
        self.dtype = inner.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        block = np.asarray(self.inner.read(start, stop))
        return block.reshape(-1, *block.shape[2:])


class UnbatchedValueError(DataError):
    """The samples of one batch disagree on the value of an unbatched input."""


class UnbatchedInput:
    """An input the model takes whole with every run, with no sample axis (a scalar temperature, a fixed ``pads``
    vector): its one value, fed unchanged with every batch.

    ``layout``: "one" (the file holds the value), "sample" (one copy per sample, ``[samples, *shape]``) or "row"
    (one row per sample, ``[samples, ...]`` for a model shape ``(1, ...)``). Per sample, every range read must hold
    the same value, since one run takes one.
    """

    def __init__(self, inner: Array, name: str, layout: str = "one") -> None:
        self.inner, self.name = inner, name
        self.per_sample, self.row = layout != "one", layout == "row"
        self.shape: tuple[int, ...] = {"one": tuple(inner.shape), "sample": tuple(inner.shape[1:]),
                                       "row": (1, *inner.shape[1:])}[layout]
        self.dtype = inner.dtype
        self._value: np.ndarray | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.per_sample:
            rows = np.asarray(self.inner.read(start, stop))
            if len(rows) > 1 and not (rows == rows[:1]).all():
                raise UnbatchedValueError(f"input '{self.name}' has no batch axis (model shape {fmt_shape(self.shape)}), so one run "
                                f"takes one value, but samples {start}..{stop - 1} differ; give every sample the same "
                                "value, or use batch size 1")
            return rows[:1] if self.row else rows[0]
        if self._value is None:
            inner = self.inner
            whole = inner.shape[0] if inner.shape else 1  # a 0-d compressed member reads as one row
            raw = np.array(inner.array) if isinstance(inner, MappedArray) else inner.read(0, whole)
            self._value = np.asarray(raw).reshape(self.shape)
        return self._value


class ZipStreamArray:
    """A compressed ``.npz`` member decompressed front to back as sample ranges are requested.

    Batches are read in order, so each byte is inflated once; a backwards read restarts the stream.
    """

    def __init__(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
        self.zf, self.info, self.path = zf, info, path
        stream = zf.open(info)
        self.shape, fortran, self.dtype = _read_npy_header(stream, f"{path}:{info.filename}")
        stream.close()
        self._stream: IO[bytes] | None = None
        self._pos = 0
        self._full: np.ndarray | None = None
        self._fortran = fortran and len(self.shape) > 1
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _restart(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = self.zf.open(self.info)
        _read_npy_header(self._stream, self.info.filename)
        self._pos = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._fortran:  # column-major bytes cannot be read by rows
            if self._full is None:
                logger.warning("%s:%s is compressed and Fortran-ordered: loading it whole", self.path, self.info.filename)
                with self.zf.open(self.info) as f:
                    self._full = np.load(f, allow_pickle=False)
            return self._full[start:stop]
        if self._stream is None or start < self._pos:
            self._restart()
        assert self._stream is not None
        _read_exact(self._stream, (start - self._pos) * self._row_bytes, discard=True)
        raw = _read_exact(self._stream, (stop - start) * self._row_bytes)
        self._pos = stop
        return np.frombuffer(raw, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))


def _read_exact(stream: IO[bytes], nbytes: int, *, discard: bool = False) -> bytes:
    """Read exactly ``nbytes`` (in bounded pieces when discarding, to skip without a big buffer)."""
    parts: list[bytes] = []
    left = nbytes
    while left > 0:
        piece = stream.read(min(left, 1 << 24) if discard else left)
        if not piece:
            raise DataError(f"{getattr(stream, 'name', 'npz member')} is truncated; re-save the file")
        left -= len(piece)
        if not discard:
            parts.append(piece)
    return b"".join(parts)


def _read_npy_header(f: IO[bytes], label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran flag and dtype from an open ``.npy`` stream, leaving it at the first data byte."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = fmt._read_array_header(f, version)  # type: ignore[attr-defined]  # v3 (utf-8 names) has no public reader
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{label} is not a valid .npy array ({exc}); re-save it with numpy.save/savez") from exc
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def _npz_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Array:
    """Memory-map an uncompressed member in place; stream a compressed one."""
    if info.compress_type != zipfile.ZIP_STORED:
        return ZipStreamArray(zf, info, path)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise DataError(f"{path} is not a valid .npz (bad zip header for {info.filename}); re-save it with numpy.savez")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = _read_npy_header(f, f"{path}:{info.filename}")
        offset = f.tell()
    _check_dtype(dtype, f"{path}:{info.filename}")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return MappedArray(np.empty(shape, dtype))
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    return MappedArray(mm)


def _check_dtype(dtype: np.dtype, label: str) -> None:
    if dtype.kind not in _NUMERIC_KINDS:
        raise DataError(f"{label} has dtype {dtype}, not numbers; save float (or int/bool) arrays")


@contextmanager
def open_arrays(path: Path) -> Iterator[dict[str, Array]]:
    """Every array of a ``.npy`` (under key ``""``) or ``.npz`` file, mapped or streamed, not loaded."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read {path} ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                            "re-save it with numpy.save") from exc
        _check_dtype(arr.dtype, str(path))
        yield {"": MappedArray(arr)}
        return
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"cannot read {path} as .npz ({exc}); re-save it with numpy.savez") from exc
    with zf:
        arrays: dict[str, Array] = {}
        for info in zf.infolist():
            if info.filename.endswith(".npy"):
                member = _npz_member(path, zf, info)
                _check_dtype(member.dtype, f"{path}:{info.filename}")
                arrays[info.filename[:-4]] = member
        try:
            yield arrays
        finally:
            for member in arrays.values():
                if isinstance(member, ZipStreamArray):
                    member.close()
