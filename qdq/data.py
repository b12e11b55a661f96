"""Calibration and evaluation data, streamed from disk in batches.

:func:`open_data` accepts

* a ``.npy`` file (single-input models; the first axis is the sample axis),
* a ``.npz`` file with one array per model input name,
* a folder of ``.npy``/``.npz`` files (each file one sample or a batch of samples, name order),
* a folder of images (``.jpg``/``.jpeg``/``.png``, name order), resized on the short side,
  center-cropped, scaled to ``x/255`` and normalised with ``(x - mean) / std`` into NCHW.

Nothing is loaded up front: ``.npy`` files and uncompressed ``.npz`` members are memory-mapped
(``np.save``/``np.savez`` write exactly that), compressed ``.npz`` members (``np.savez_compressed``)
are decompressed sequentially as batches are read, and images are decoded one by one. Memory is
therefore bounded by one batch, whatever the number of samples. The one exception is a *compressed*
Fortran-ordered member with 2+ dims, which cannot be read by rows and is loaded whole (logged).

Problems are raised as one-line :class:`~qdq.errors.DataError` messages naming the fix: a missing
path, no samples, an ``.npz`` without an array for a model input, arrays whose dims do not match
the model input, or NaN/Inf values (checked on every batch as it is read).
"""

from __future__ import annotations

import logging
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from qdq.errors import ConfigError, DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "DataSource",
    "open_data",
    "labels_from_file",
    "image_labels",
    "InputShape",
]

logger = logging.getLogger(__name__)

#: File suffixes (lower case) read as images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ARRAY_SUFFIXES = (".npy", ".npz")
#: dtype kinds accepted and cast to float32: bool, signed/unsigned int, float.
_NUMERIC_KINDS = "biuf"

#: A model input shape: ints for fixed dims, str/None for dynamic ones.
InputShape = Sequence[int | str | None]


# ----------------------------------------------------------------------------- on-disk arrays


class _Array(Protocol):
    """An array on disk whose samples (first axis) are read by range, never all at once."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, start: int, stop: int) -> np.ndarray: ...


class _MappedArray:
    """A memory-mapped (or, rarely, in-memory) array: ranges are plain slices."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype: np.dtype = array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


class _SingleSample:
    """A file holding one sample: exposed with a leading sample axis of size 1."""

    def __init__(self, inner: _Array) -> None:
        self.inner = inner
        self.shape = (1, *inner.shape)
        self.dtype = inner.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.inner.shape), self.dtype)
        return self.inner.read(0, self.inner.shape[0])[None]


class _ZipStreamArray:
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
            shape, fortran, dtype = fmt._read_array_header(f, version)  # v3 (utf-8 names) has no public reader
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{label} is not a valid .npy array ({exc}); re-save it with numpy.save/savez") from exc
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def _npz_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Array:
    """Memory-map an uncompressed member in place; stream a compressed one."""
    if info.compress_type != zipfile.ZIP_STORED:
        return _ZipStreamArray(zf, info, path)
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
        return _MappedArray(np.empty(shape, dtype))
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    return _MappedArray(mm)


def _check_dtype(dtype: np.dtype, label: str) -> None:
    if dtype.kind not in _NUMERIC_KINDS:
        raise DataError(f"{label} has dtype {dtype}, not numbers; save float (or int/bool) arrays")


@contextmanager
def _open_arrays(path: Path) -> Iterator[dict[str, _Array]]:
    """Every array of a ``.npy`` (under key ``""``) or ``.npz`` file, mapped or streamed, not loaded."""
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read {path} ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                            "re-save it with numpy.save") from exc
        _check_dtype(arr.dtype, str(path))
        yield {"": _MappedArray(arr)}
        return
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"cannot read {path} as .npz ({exc}); re-save it with numpy.savez") from exc
    with zf:
        arrays: dict[str, _Array] = {}
        for info in zf.infolist():
            if info.filename.endswith(".npy"):
                member = _npz_member(path, zf, info)
                _check_dtype(member.dtype, f"{path}:{info.filename}")
                arrays[info.filename[:-4]] = member
        try:
            yield arrays
        finally:
            for member in arrays.values():
                if isinstance(member, _ZipStreamArray):
                    member.close()


# ----------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class _Chunk:
    """Consecutive samples stored in one file: ``count`` of them, read through ``open``."""

    path: Path
    count: int
    open: Callable[[], AbstractContextManager[dict[str, _Array]]]


def _fmt_shape(shape: Sequence[object]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _is_single_sample(name: str, shape: tuple[int, ...], model_shape: InputShape | None, label: str) -> bool:
    """Whether a file's array is one sample (rank one below the model input) or a batch of samples.

    Without a known model rank every array is a batch whose first axis is the sample axis.
    """
    if model_shape is None:
        if not shape:
            raise DataError(f"{label}: input '{name}' is a scalar; save arrays with a leading sample axis")
        return False
    rank = len(model_shape)
    if len(shape) == rank:
        return False
    if len(shape) == rank - 1 and shape:
        return True
    raise DataError(
        f"{label}: input '{name}' has {len(shape)} dims {_fmt_shape(shape)} but the model input has {rank} "
        f"{_fmt_shape(model_shape)}; save [samples, ...] arrays of the model input's rank"
    )


def _check_sample_shape(name: str, sample: tuple[int, ...], model_shape: InputShape | None, label: str) -> None:
    """Compare a sample's dims with the model input's fixed dims (dynamic dims match anything)."""
    if model_shape is None:
        return
    for got, want in zip(sample, list(model_shape)[1:]):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(
                f"{label}: input '{name}' samples have shape {_fmt_shape(sample)} but the model expects "
                f"{_fmt_shape(model_shape)} (first dim = batch); resize or re-save the data"
            )


def _array_chunk(path: Path, input_names: Sequence[str], shapes: Mapping[str, InputShape | None]) -> tuple[
        _Chunk, dict[str, tuple[int, ...]]]:
    """Scan one ``.npy``/``.npz`` file's headers: its sample count and per-input sample shapes."""
    with _open_arrays(path) as arrays:
        keys = _select_keys(path, arrays, input_names)
        singles: dict[str, bool] = {}
        samples: dict[str, tuple[int, ...]] = {}
        counts: dict[str, int] = {}
        for name in input_names:
            shape = arrays[keys[name]].shape
            single = _is_single_sample(name, shape, shapes.get(name), str(path))
            singles[name] = single
            samples[name] = shape if single else shape[1:]
            counts[name] = 1 if single else shape[0]
            _check_sample_shape(name, samples[name], shapes.get(name), str(path))
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise DataError(f"{path}: inputs have different sample counts ({detail}); save the same number per input")

    @contextmanager
    def opener() -> Iterator[dict[str, _Array]]:
        with _open_arrays(path) as arrays:
            yield {n: _SingleSample(arrays[keys[n]]) if singles[n] else arrays[keys[n]] for n in input_names}

    return _Chunk(path, counts[input_names[0]], opener), samples


def _select_keys(path: Path, arrays: Mapping[str, _Array], input_names: Sequence[str]) -> dict[str, str]:
    """Which array of the file feeds each model input (an .npz needs one array per input name)."""
    if "" in arrays:  # .npy
        if len(input_names) != 1:
            raise DataError(
                f"{path} holds one array but the model has {len(input_names)} inputs ({', '.join(input_names)}); "
                "use an .npz with one array per input name"
            )
        return {input_names[0]: ""}
    if len(input_names) == 1 and input_names[0] not in arrays and len(arrays) == 1:
        return {input_names[0]: next(iter(arrays))}  # np.savez(path, x) names it arr_0: unambiguous
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise DataError(
            f"{path} has no array for model input(s) {', '.join(missing)} (arrays: {', '.join(arrays) or 'none'}; "
            f"model inputs: {', '.join(input_names)}); save it with numpy.savez(path, <input name>=array, ...)"
        )
    return {n: n for n in input_names}


# ----------------------------------------------------------------------------- images


def _list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes), key=lambda p: p.name)


def _per_channel(value: float | Sequence[float] | None, default: float, channels: int, what: str) -> np.ndarray:
    """``mean``/``std`` as a [C, 1, 1] float32 array (a scalar applies to every channel)."""
    arr = np.asarray(default if value is None else value, dtype=np.float32).reshape(-1)
    if arr.size not in (1, channels):
        raise ConfigError(f"{what} needs 1 or {channels} values (one per channel), got {arr.size}")
    if what == "std" and np.any(arr == 0):
        raise ConfigError("std must not contain 0 (it divides the pixel values)")
    return np.broadcast_to(arr, (channels,)).reshape(channels, 1, 1).copy()


def _image_size(image_size: int | Sequence[int] | None, model_shape: InputShape | None, label: str) -> tuple[int, int]:
    """Target (height, width): from ``image_size`` or else the model input's fixed H and W."""
    if image_size is None:
        if model_shape is not None and len(model_shape) == 4:
            h, w = model_shape[2], model_shape[3]
            if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
                return h, w
        raise DataError(f"{label} is a folder of images but the model input size is not fixed; pass image_size "
                        "(e.g. --image-size 224)")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size[0], size[1]


class _ImageArray:
    """One image file as a [1, C, H, W] float32 sample, decoded only when read."""

    def __init__(self, path: Path, size: tuple[int, int], mean: np.ndarray, std: np.ndarray) -> None:
        self.path, self.size, self.mean, self.std = path, size, mean, std
        self.shape = (1, mean.shape[0], *size)
        self.dtype = np.dtype(np.float32)

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.shape[1:]), np.float32)
        return load_image(self.path, self.size, self.mean, self.std)[None]


def load_image(path: Path, size: tuple[int, int], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Decode an image to a normalised float32 [C, H, W] array.

    Resizes (bicubic) so the image covers ``size`` with its aspect ratio kept, center-crops to
    ``size`` (the usual ImageNet evaluation transform), then applies ``(x/255 - mean) / std``.
    ``mean``/``std`` are [C, 1, 1]; C = 1 reads grayscale, otherwise RGB.
    """
    from PIL import Image, UnidentifiedImageError

    th, tw = size
    try:
        with Image.open(path) as img:
            img = img.convert("L" if mean.shape[0] == 1 else "RGB")
            w, h = img.size
            if (w, h) != (tw, th):
                scale = max(tw / w, th / h)
                nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
                img = img.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - tw) // 2, (nh - th) // 2
                img = img.crop((left, top, left + tw, top + th))
            x = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); remove or replace the file") from exc
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _image_chunks(files: Sequence[Path], name: str, size: tuple[int, int], mean: np.ndarray,
                  std: np.ndarray) -> list[_Chunk]:
    def make(path: Path) -> _Chunk:
        @contextmanager
        def opener() -> Iterator[dict[str, _Array]]:
            yield {name: _ImageArray(path, size, mean, std)}

        return _Chunk(path, 1, opener)

    return [make(p) for p in files]


# ----------------------------------------------------------------------------- data source


class DataSource:
    """Samples for a model's inputs, read lazily from disk and served as float32 batches.

    Build it with :func:`open_data`. ``len()`` is the number of samples served (after
    ``num_samples``); :meth:`batches` may be called any number of times.
    """

    def __init__(self, path: Path, input_names: Sequence[str], chunks: Sequence[_Chunk], *, kind: str,
                 total_samples: int, role: str = "calibration") -> None:
        self.path = path
        self.input_names = list(input_names)
        self.kind = kind  #: "npy", "npz", "array folder" or "image folder"
        self.total_samples = total_samples  #: samples available before ``num_samples`` was applied
        self.role = role
        self._chunks = list(chunks)
        self._len = sum(c.count for c in self._chunks)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"DataSource({str(self.path)!r}, {self.kind}, {self._len} samples, inputs={self.input_names})"

    @property
    def files(self) -> list[Path]:
        """The files that provide the served samples, in order (one per image for image folders)."""
        return [c.path for c in self._chunks]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input name: float32 C-contiguous [n, ...]}`` with n = ``batch_size`` (the last may be smaller).

        Samples are read file by file and range by range, so at most one batch is held in memory.
        Raises DataError on NaN/Inf, naming the file and the sample range within it.
        """
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        pending: list[dict[str, np.ndarray]] = []
        filled = 0
        for chunk in self._chunks:
            with chunk.open() as arrays:
                pos = 0
                while pos < chunk.count:
                    stop = min(chunk.count, pos + batch_size - filled)
                    piece = {n: np.array(arrays[n].read(pos, stop), dtype=np.float32, order="C")
                             for n in self.input_names}
                    self._check_finite(piece, chunk, pos)
                    pending.append(piece)
                    filled += stop - pos
                    pos = stop
                    if filled == batch_size:
                        yield _concat(pending, self.input_names)
                        pending, filled = [], 0
        if pending:
            yield _concat(pending, self.input_names)

    def _check_finite(self, piece: Mapping[str, np.ndarray], chunk: _Chunk, start: int) -> None:
        for name, x in piece.items():
            finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1) if x.ndim else np.isfinite(x)
            if not np.all(finite):
                bad = np.flatnonzero(~finite) + start
                raise DataError(
                    f"NaN/Inf in {self.role} data file {chunk.path}, sample range {bad[0]}..{bad[-1]} "
                    f"({bad.size} bad sample(s), input '{name}'); fix or remove those samples"
                )


def _concat(pieces: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> dict[str, np.ndarray]:
    if len(pieces) == 1:
        return dict(pieces[0])
    return {n: np.concatenate([p[n] for p in pieces], axis=0) for n in names}


def open_data(
    path: str | Path,
    input_names: Sequence[str],
    *,
    image_size: int | Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    num_samples: int | None = None,
    input_shapes: Mapping[str, InputShape | None] | None = None,
    role: str = "calibration",
) -> DataSource:
    """Open calibration/evaluation data without loading it (see the module docstring for formats).

    ``input_names`` are the model inputs, in order. ``input_shapes`` (model input shapes, dynamic
    dims as str/None) enables shape checks and lets a file hold a single sample (one dim fewer
    than the model input); without it every array's first axis is the sample axis. ``image_size``
    (int or (H, W); default: the model's fixed H, W), ``mean`` and ``std`` (scalar or per channel,
    applied to x/255; default 0 and 1) only apply to image folders. ``num_samples`` keeps the first
    N samples. ``role`` ("calibration"/"evaluation") only words error messages.
    """
    names = list(input_names)
    if not names:
        raise DataError("the model has no inputs to feed; check the model")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
        raise ConfigError(f"num_samples must be a positive int, got {num_samples!r}")
    shapes = dict(input_shapes or {})
    path = Path(path)
    if not path.exists():
        raise DataError(f"{role} data not found: {path}; pass an existing .npy, .npz or folder of .npy/.npz/images")

    chunks: list[_Chunk]
    if path.is_file():
        if path.suffix.lower() not in _ARRAY_SUFFIXES:
            raise DataError(f"unsupported {role} data file {path}; pass a .npy, .npz or a folder of .npy/.npz/images")
        chunk, _ = _array_chunk(path, names, shapes)
        chunks, kind = [chunk], path.suffix.lower()[1:]
    else:
        arrays, images = _list_files(path, _ARRAY_SUFFIXES), _list_files(path, IMAGE_SUFFIXES)
        if arrays and images:
            raise DataError(f"{path} mixes .npy/.npz and image files; keep one kind of {role} data per folder")
        if arrays:
            chunks, kind = _array_folder(path, arrays, names, shapes), "array folder"
        elif images:
            chunks, kind = _image_folder(path, images, names, shapes, image_size, mean, std, role), "image folder"
        else:
            subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
            hint = f" (subfolders are not searched: {', '.join(subdirs[:3])})" if subdirs else ""
            raise DataError(f"{role} data is empty: {path} has no .npy, .npz, .jpg, .jpeg or .png files{hint}; "
                            "point at the folder that holds them")
    chunks = [c for c in chunks if c.count > 0]
    total = sum(c.count for c in chunks)
    if total == 0:
        raise DataError(f"{role} data is empty: {path} has 0 samples; save at least one sample")
    if num_samples is not None:
        chunks = _take(chunks, num_samples)
        if num_samples > total:
            logger.warning("%s data %s has %d samples, fewer than the %d requested: using all", role, path, total,
                           num_samples)
    source = DataSource(path, names, chunks, kind=kind, total_samples=total, role=role)
    logger.debug("opened %r", source)
    return source


def _array_folder(folder: Path, files: Sequence[Path], names: Sequence[str],
                  shapes: Mapping[str, InputShape | None]) -> list[_Chunk]:
    """One chunk per file; every file must give each input the same sample shape (so batches stack)."""
    chunks: list[_Chunk] = []
    first: tuple[Path, dict[str, tuple[int, ...]]] | None = None
    for f in files:
        chunk, samples = _array_chunk(f, names, shapes)
        if first is None:
            first = (f, samples)
        elif samples != first[1]:
            name = next(n for n in names if samples[n] != first[1][n])
            raise DataError(
                f"{folder}: input '{name}' samples are {_fmt_shape(first[1][name])} in {first[0].name} but "
                f"{_fmt_shape(samples[name])} in {f.name}; give every file the same sample shape"
            )
        chunks.append(chunk)
    return chunks


def _image_folder(folder: Path, files: Sequence[Path], names: Sequence[str], shapes: Mapping[str, InputShape | None],
                  image_size: int | Sequence[int] | None, mean: float | Sequence[float] | None,
                  std: float | Sequence[float] | None, role: str) -> list[_Chunk]:
    if len(names) != 1:
        raise DataError(f"{folder} is a folder of images but the model has {len(names)} inputs "
                        f"({', '.join(names)}); use .npz files with one array per input")
    model_shape = shapes.get(names[0])
    if model_shape is not None and len(model_shape) != 4:
        raise DataError(f"{folder} holds images (NCHW) but model input '{names[0]}' has {len(model_shape)} dims "
                        f"{_fmt_shape(model_shape)}; use .npy/.npz {role} data")
    channels = model_shape[1] if model_shape is not None and model_shape[1] in (1, 3) else 3
    assert isinstance(channels, int)
    size = _image_size(image_size, model_shape, str(folder))
    _check_sample_shape(names[0], (channels, *size), model_shape, str(folder))
    return _image_chunks(files, names[0], size, _per_channel(mean, 0.0, channels, "mean"),
                         _per_channel(std, 1.0, channels, "std"))


def _take(chunks: Sequence[_Chunk], n: int) -> list[_Chunk]:
    """The chunks covering the first ``n`` samples, the last one cut short."""
    out: list[_Chunk] = []
    left = n
    for c in chunks:
        if left <= 0:
            break
        out.append(c if c.count <= left else _Chunk(c.path, left, c.open))
        left -= c.count
    return out


# ----------------------------------------------------------------------------- labels


def labels_from_file(path: str | Path) -> np.ndarray:
    """Integer class labels, one per sample in data order, from a 1-D ``.npy`` or a text file.

    A text file holds one integer per line; blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}; pass a .npy of ints or a text file with one int per line")
    if path.suffix.lower() == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"cannot read labels {path} ({exc}); re-save it with numpy.save") from exc
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"labels {path} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        return labels.astype(np.int64)
    values: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                values.append(int(text))
            except ValueError:
                raise DataError(f"labels {path} line {lineno}: {text[:40]!r} is not an integer; "
                                "write one integer label per line") from None
    if not values:
        raise DataError(f"labels file {path} is empty; write one integer label per line")
    return np.asarray(values, dtype=np.int64)


#: Leading class index in an image file name, e.g. ``0042_n01234567_name.jpg`` (the ImageNet sample layout).
_LABEL_IN_NAME = re.compile(r"^(\d+)_")


def image_labels(folder: str | Path, num_samples: int | None = None) -> np.ndarray | None:
    """Labels parsed from image file names ``<int>_...`` in the order :func:`open_data` reads them.

    Returns None when the folder has no images or any name lacks the leading ``<int>_``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = _list_files(folder, IMAGE_SUFFIXES)[:num_samples]
    matches = [_LABEL_IN_NAME.match(p.name) for p in files]
    if not files or not all(matches):
        return None
    return np.asarray([int(m.group(1)) for m in matches if m], dtype=np.int64)
