"""DataSource: a model's input samples read lazily from files, served batch by batch.

Given the model's input signature (:class:`~qdq.model_inputs.ModelInputs`), headers are checked
when the data is opened (names, dtype kind, rank, static dims: one line naming the input, what
it got and what it expects) and every batch is served in the model's dtypes (float16 model ->
float16 batches, int64 ids stay int64). Without a signature float data is served as float32 and
integer/bool data as stored.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qdq.data.arrays import (
    ARRAY_SUFFIXES,
    Array,
    MappedArray,
    SingleSample,
    StackedInputs,
    UnbatchedInput,
    UnbatchedValueError,
    open_arrays,
)
from qdq.data.images import IMAGE_SUFFIXES, ImageArray, InputShape, list_files, per_channel, target_size
from qdq.data.text import TEXT_SUFFIXES
from qdq.errors import ConfigError, DataError
from qdq.model_inputs import ModelInputs, fits, fmt_shape

__all__ = ["DataSource", "open_data"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Chunk:
    """Consecutive samples stored in one file: ``count`` of them, read through ``open``."""

    path: Path
    count: int
    open: Callable[[], AbstractContextManager[dict[str, Array]]]
    rows: int = 1  #: rows of the model's first dim per sample (> 1: the file holds whole inputs, StackedInputs)


def _whole_inputs(shape: tuple[int, ...], model_shape: InputShape | None, static_batch: int | None) -> bool:
    """A file array ``[samples, *input shape]`` for a model whose first dim is fixed (a vector without batch axis, a
    static batch): one dim more than the model input, the rest its shape, every dim of which is fixed."""
    return (model_shape is not None and static_batch is not None and len(shape) > 0
            and all(isinstance(d, int) for d in model_shape) and fits(shape[1:], model_shape))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_single_sample(name: str, shape: tuple[int, ...], model_shape: InputShape | None, label: str) -> bool:
    """Whether a file's array is one sample (rank one below the model input) or a batch of samples.

    Without a known model rank every array is a batch whose first axis is the sample axis.
    """
    if model_shape is None:
        if not shape:
            raise DataError(f"{label}: input '{name}' is a scalar; save arrays with a leading sample axis")
        return False
    rank = len(model_shape)
    if rank == 0:
        if shape:
            raise DataError(f"{label}: model input '{name}' is a scalar (rank 0), one value for every run, but the "
                            f"file has an array {fmt_shape(shape)}; save one 0-d value for it")
        return True
    if len(shape) == rank:
        return False
    if len(shape) == rank - 1 and shape:
        return True
    raise DataError(
        f"{label}: input '{name}' has {len(shape)} dims {fmt_shape(shape)} but the model input has {rank} "
        f"{fmt_shape(model_shape)}; save [samples, ...] arrays of the model input's rank"
    )


def _unbatched_layout(name: str, shape: tuple[int, ...], model_shape: InputShape | None, label: str) -> str:
    """How a file holds an unbatched input: its one value ("one"), one copy per sample ("sample":
    ``[samples, *shape]``) or, for a model shape ``(1, ...)``, one row per sample ("row": ``position_ids`` saved
    ``(samples, S)`` for a ``(1, S)`` input)."""
    want = tuple(model_shape or ())
    if fits(shape, want):
        return "one"
    if shape and fits(shape[1:], want):
        return "sample"
    if want and want[0] == 1 and len(shape) == len(want) and fits(shape[1:], want[1:]):
        return "row"
    what = "is a scalar (rank 0)" if not want else f"has no batch axis (model shape {fmt_shape(want)})"
    value = "0-d" if not want else fmt_shape(want)
    raise DataError(f"{label}: model input '{name}' {what}, one value for every run, but the file has "
                    f"{fmt_shape(shape)}; save one {value} value for it (or one per sample, "
                    f"{fmt_shape(('samples', *want))}, all the same)")


def _check_sample_shape(name: str, sample: tuple[int, ...], model_shape: InputShape | None, label: str) -> None:
    """Compare a sample's dims with the model input's fixed dims (dynamic dims match anything)."""
    if model_shape is None:
        return
    for got, want in zip(sample, list(model_shape)[1:]):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(
                f"{label}: input '{name}' samples have shape {fmt_shape(sample)} but the model expects "
                f"{fmt_shape(model_shape)} (first dim = batch); resize or re-save the data"
            )


def _select_keys(path: Path, arrays: Mapping[str, Array], names: Sequence[str],
                 optional: Sequence[str] = ()) -> dict[str, str]:
    """Which array of the file feeds each model input (an .npz needs one array per required input name)."""
    if "" in arrays:  # .npy
        if len(names) != 1:
            raise DataError(
                f"{path} holds one array but the model has {len(names)} inputs ({', '.join(names)}); "
                "use an .npz with one array per input name"
            )
        return {names[0]: ""}
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
        return {names[0]: next(iter(arrays))}  # np.savez(path, x) names it arr_0: unambiguous
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(
            f"{path} has no array for model input(s) {', '.join(missing)} (arrays: {', '.join(arrays) or 'none'}; "
            f"model inputs: {', '.join(names)}); save it with numpy.savez(path, <input name>=array, ...)"
        )
    return {n: n for n in [*names, *(o for o in optional if o in arrays)]}


def _array_chunk(path: Path, names: Sequence[str], shapes: Mapping[str, InputShape | None],
                 signature: ModelInputs | None) -> tuple[_Chunk, dict[str, tuple[int, ...]]]:
    """Scan one ``.npy``/``.npz`` file's headers: its sample count and per-input sample shapes."""
    optional = [s.name for s in signature.specs if s.optional] if signature is not None else []
    with open_arrays(path) as arrays:
        keys = _select_keys(path, arrays, names, optional)
        singles: dict[str, bool] = {}
        samples: dict[str, tuple[int, ...]] = {}
        counts: dict[str, int] = {}
        unbatched = signature.unbatched if signature is not None else set()
        layouts: dict[str, str] = {}  # unbatched inputs: how the file holds them (_unbatched_layout)
        stacked: set[str] = set()  # inputs saved as whole inputs, one per sample
        for name in keys:
            member = arrays[keys[name]]
            shape = member.shape
            if name in unbatched:
                layouts[name] = _unbatched_layout(name, shape, shapes.get(name), str(path))
                samples[name] = UnbatchedInput(member, name, layouts[name]).shape  # the model's view of it
                assert signature is not None
                signature.check_array(name, member.dtype, samples[name], str(path))
                if layouts[name] != "one":
                    counts[name] = shape[0]
                continue
            model_shape = shapes.get(name)
            if signature is not None and _whole_inputs(shape, model_shape, signature.static_batch):
                stacked.add(name)  # [samples, *input shape]: each sample is one whole run
                samples[name] = shape[1:]
                signature.check_array(name, member.dtype, shape[1:], str(path))
                counts[name] = shape[0]
                continue
            single = _is_single_sample(name, shape, model_shape, str(path))
            singles[name] = single
            samples[name] = shape if single else shape[1:]
            if signature is not None:
                signature.check_array(name, member.dtype, samples[name] if single else shape, str(path),
                                      batched=not single or not shape)
            else:
                _check_sample_shape(name, samples[name], shapes.get(name), str(path))
            if name in names and shape:  # a scalar input's one value goes with every batch: no sample count
                counts[name] = 1 if single else shape[0]
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise DataError(f"{path}: inputs have different sample counts ({detail}); save the same number per input")
    batched = [n for n in counts if n not in layouts]
    if stacked and len(stacked) != len(batched):
        raise DataError(f"{path}: inputs {', '.join(stacked)} hold whole inputs per sample (one dim more than the "
                        f"model input) but {', '.join(n for n in batched if n not in stacked)} do not; save every "
                        "input the same way")

    def wrap(name: str, member: Array) -> Array:
        if name in stacked:
            return StackedInputs(member)
        if name in layouts:
            return UnbatchedInput(member, name, layouts[name])
        if singles[name]:
            return SingleSample(member) if samples[name] else UnbatchedInput(member, name)
        return member

    @contextmanager
    def opener() -> Iterator[dict[str, Array]]:
        with open_arrays(path) as arrays:
            yield {n: wrap(n, arrays[keys[n]]) for n in keys}

    rows = signature.static_batch if stacked and signature is not None and signature.static_batch else 1
    return _Chunk(path, next(iter(counts.values()), 1), opener, rows), samples


def _text_chunk(path: Path, names: Sequence[str], tokenizer: str | Path | None, seq_len: int | None,
                signature: ModelInputs | None, role: str) -> _Chunk:
    """One chunk for a sentences file: lines counted now, tokenized when read."""
    from qdq.data.text import count_lines, tokenize_lines

    if tokenizer is None:
        raise DataError(f"{role} data {path} is text: pass --tokenizer PATH (a local Hugging Face tokenizer folder) "
                        "to turn its lines into model inputs")
    count = count_lines(path)
    dtypes = {spec.name: spec.dtype for spec in signature.specs} if signature is not None else None

    @contextmanager
    def opener() -> Iterator[dict[str, Array]]:
        yield {n: MappedArray(a) for n, a in tokenize_lines(path, tokenizer, names, seq_len, dtypes).items()}

    return _Chunk(path, count, opener)


def _image_chunks(files: Sequence[Path], name: str, size: tuple[int, int], mean: np.ndarray,
                  std: np.ndarray) -> list[_Chunk]:
    def make(path: Path) -> _Chunk:
        @contextmanager
        def opener() -> Iterator[dict[str, Array]]:
            yield {name: ImageArray(path, size, mean, std)}

        return _Chunk(path, 1, opener)

    return [make(p) for p in files]


class DataSource:
    """Samples for a model's inputs, read lazily from disk and served as batches.

    Build it with :func:`open_data`. ``len()`` is the number of samples served (after
    ``num_samples``); :meth:`batches` may be called any number of times. With a ``signature``
    (the model's inputs) batches come in the model's dtypes, else float data as float32.
    """

    def __init__(self, path: Path, input_names: Sequence[str], chunks: Sequence[_Chunk], *, kind: str,
                 total_samples: int, role: str = "calibration", signature: ModelInputs | None = None) -> None:
        self.path = path
        self.input_names = list(input_names)
        self.kind = kind  #: "npy", "npz", "array folder" or "image folder"
        self.total_samples = total_samples  #: samples available before ``num_samples`` was applied
        self.role = role
        self.signature = signature
        self._chunks = list(chunks)
        self._len = sum(c.count for c in self._chunks)
        rows = {c.rows for c in self._chunks}
        if len(rows) > 1:
            raise DataError(f"{path}: some files hold whole inputs per sample (one dim more than the model input) and "
                            "some do not; save every file the same way")
        #: rows of the model's first dim per sample: > 1 when the files hold whole inputs of a model whose first
        #: dim is fixed (each sample then runs alone, as those rows)
        self.rows_per_sample = rows.pop() if rows else 1

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"DataSource({str(self.path)!r}, {self.kind}, {self._len} samples, inputs={self.input_names})"

    @property
    def files(self) -> list[Path]:
        """The files that provide the served samples, in order (one per image for image folders)."""
        return [c.path for c in self._chunks]

    def _convert(self, name: str, x: np.ndarray, where: str) -> np.ndarray:
        """One read range in the model's dtype (or float32), always a copy: never a view of a memory map."""
        if self.signature is not None and name in self.signature.by_name:
            out = self.signature.convert(name, x, where)
            return np.array(out) if np.may_share_memory(out, x) else out
        if x.dtype.kind == "f" and x.dtype != np.float32:
            return np.array(x, dtype=np.float32, order="C")
        return np.array(x, order="C")

    def effective_batch_size(self, batch_size: int) -> int:
        """The samples :meth:`batches` serves per batch for ``batch_size``: rounded up to a multiple of a static
        model batch (the model runs that many rows at a time: others would be padded with copies)."""
        static = self.signature.static_batch if self.signature is not None else None
        return _round_up(batch_size, static) if static and self.rows_per_sample == 1 else batch_size

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input name: C-contiguous [n, ...]}`` with n = ``batch_size`` (the last may be smaller).

        Samples are read file by file and range by range, so at most one batch is held in memory.
        Raises DataError on NaN/Inf, naming the file and the sample range within it.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = self.effective_batch_size(batch_size)
        pending: list[dict[str, np.ndarray]] = []
        filled = 0
        unbatched = self.signature.unbatched if self.signature is not None else set()
        for chunk in self._chunks:
            with chunk.open() as arrays:
                pos = 0
                while pos < chunk.count:
                    stop = min(chunk.count, pos + batch_size - filled)
                    where = f"{self.role} data file {chunk.path}"
                    try:
                        piece = {n: self._convert(n, np.asarray(a.read(pos, stop)), where) for n, a in arrays.items()}
                    except UnbatchedValueError as exc:
                        raise DataError(f"{where}: {exc}") from exc
                    self._check_finite(piece, chunk, pos)
                    pending.append(piece)
                    filled += stop - pos
                    pos = stop
                    if filled == batch_size:
                        yield _concat(pending, unbatched)
                        pending, filled = [], 0
        if pending:
            yield _concat(pending, unbatched)

    def _check_finite(self, piece: Mapping[str, np.ndarray], chunk: _Chunk, start: int) -> None:
        for name, x in piece.items():
            if x.dtype.kind != "f":
                continue
            batched = x.ndim and (self.signature is None or name not in self.signature.unbatched)
            finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1) if batched else np.isfinite(x).all()
            if not np.all(finite):
                bad = np.flatnonzero(~finite) + start
                raise DataError(
                    f"NaN/Inf in {self.role} data file {chunk.path}, sample range {bad[0]}..{bad[-1]} "
                    f"({bad.size} bad sample(s), input '{name}'); fix or remove those samples"
                )


def _concat(pieces: Sequence[Mapping[str, np.ndarray]], unbatched: set[str] | frozenset[str] = frozenset()
            ) -> dict[str, np.ndarray]:
    """One batch from the pieces read from several files: batched inputs joined by sample, an unbatched input's one
    value (scalars included) kept when every file agrees on it."""
    if len(pieces) == 1:
        return dict(pieces[0])
    whole = {n for n, x in pieces[0].items() if not x.ndim or n in unbatched}
    for n in whole:
        x = pieces[0][n]
        if any(not np.array_equal(p[n], x) for p in pieces[1:]):
            what = "scalar input" if not x.ndim else "input"
            raise DataError(f"{what} '{n}' has different values in the data files of one batch ({_brief(x)} and "
                            f"others); it takes one value per run: give it one value in every file, or split the runs")
    return {n: pieces[0][n] if n in whole else np.concatenate([p[n] for p in pieces], axis=0) for n in pieces[0]}


def _brief(x: np.ndarray) -> str:
    return str(x) if x.size <= 8 else f"{fmt_shape(x.shape)} array"


def open_data(
    path: str | Path,
    input_names: Sequence[str] | ModelInputs,
    *,
    image_size: int | Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    num_samples: int | None = None,
    input_shapes: Mapping[str, InputShape | None] | None = None,
    role: str = "calibration",
    tokenizer: str | Path | None = None,
    seq_len: int | None = None,
) -> DataSource:
    """Open calibration/evaluation data without loading it (see :mod:`qdq.data` for formats).

    ``input_names``: the model inputs in order, or better the model's signature
    (:func:`qdq.model_inputs.model_inputs`), which checks every file's headers against the
    model now (dtype kind, rank, static dims; optional inputs may be absent) and serves batches
    in the model's dtypes. ``input_shapes`` (model input shapes, dynamic dims as str/None)
    enables shape checks and lets a file hold a single sample (one dim fewer than the model
    input); without shapes every array's first axis is the sample axis. ``image_size`` (int or
    (H, W); default: the model's fixed H, W), ``mean`` and ``std`` (scalar or per channel, applied
    to x/255; default 0 and 1) only apply to image folders. ``num_samples`` keeps the first N
    samples. ``role`` ("calibration"/"evaluation") only words error messages. A ``.txt`` file holds
    sentences, one per line, tokenized with the local Hugging Face ``tokenizer`` folder to ``seq_len``
    (default 128; :mod:`qdq.data.text`).
    """
    signature = input_names if isinstance(input_names, ModelInputs) else None
    names: list[str] = signature.required_names if signature is not None else [str(n) for n in input_names]
    if not names:
        raise DataError("the model has no inputs to feed; check the model")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples <= 0):
        raise ConfigError(f"num_samples must be a positive int, got {num_samples!r}")
    shapes: dict[str, InputShape | None] = dict(signature.shapes() if signature is not None else {})
    shapes.update(input_shapes or {})
    path = Path(path)
    if not path.exists():
        raise DataError(f"{role} data not found: {path}; pass an existing .npy, .npz or folder of .npy/.npz/images")

    chunks: list[_Chunk]
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        chunks, kind = [_text_chunk(path, names, tokenizer, seq_len, signature, role)], "text"
    elif path.is_file():
        if path.suffix.lower() not in ARRAY_SUFFIXES:
            raise DataError(f"unsupported {role} data file {path}; pass a .npy, .npz, a .txt of sentences "
                            "(with --tokenizer) or a folder of .npy/.npz/images")
        chunk, _ = _array_chunk(path, names, shapes, signature)
        chunks, kind = [chunk], path.suffix.lower()[1:]
    else:
        arrays, images = list_files(path, ARRAY_SUFFIXES), list_files(path, IMAGE_SUFFIXES)
        if arrays and images:
            raise DataError(f"{path} mixes .npy/.npz and image files; keep one kind of {role} data per folder")
        if arrays:
            chunks, kind = _array_folder(path, arrays, names, shapes, signature), "array folder"
        elif images:
            chunks = _image_folder(path, images, names, shapes, image_size, mean, std, role, signature)
            kind = "image folder"
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
        take = num_samples
        static = signature.static_batch if signature is not None else None
        if role == "calibration" and static and chunks and chunks[0].rows == 1:
            # rows of a static batch run together: a cut inside one would calibrate on copies of its first rows
            take = _round_up(num_samples, static)
            if take != num_samples:
                logger.info("%d calibration samples rounded up to %d, a multiple of the model's batch", num_samples,
                            take)
        chunks = _take(chunks, take)
        if num_samples > total:
            logger.warning("%s data %s has %d samples, fewer than the %d requested: using all", role, path, total,
                           num_samples)
    source = DataSource(path, names, chunks, kind=kind, total_samples=total, role=role, signature=signature)
    logger.debug("opened %r", source)
    return source


def _array_folder(folder: Path, files: Sequence[Path], names: Sequence[str],
                  shapes: Mapping[str, InputShape | None], signature: ModelInputs | None) -> list[_Chunk]:
    """One chunk per file; every file must give each input the same sample shape (so batches stack)."""
    chunks: list[_Chunk] = []
    first: tuple[Path, dict[str, tuple[int, ...]]] | None = None
    for f in files:
        chunk, samples = _array_chunk(f, names, shapes, signature)
        if first is None:
            first = (f, samples)
        elif samples != first[1]:
            name = next((n for n in samples if samples[n] != first[1].get(n)), None) or next(iter(first[1]))
            raise DataError(
                f"{folder}: input '{name}' samples are {fmt_shape(first[1].get(name))} in {first[0].name} but "
                f"{fmt_shape(samples.get(name))} in {f.name}; give every file the same sample shape (and the "
                "same optional inputs)"
            )
        chunks.append(chunk)
    return chunks


def _image_folder(folder: Path, files: Sequence[Path], names: Sequence[str], shapes: Mapping[str, InputShape | None],
                  image_size: int | Sequence[int] | None, mean: float | Sequence[float] | None,
                  std: float | Sequence[float] | None, role: str, signature: ModelInputs | None) -> list[_Chunk]:
    if len(names) != 1:
        raise DataError(f"{folder} is a folder of images but the model has {len(names)} inputs "
                        f"({', '.join(names)}); use .npz files with one array per input")
    model_shape = shapes.get(names[0])
    if model_shape is not None and len(model_shape) != 4:
        raise DataError(f"{folder} holds images (NCHW) but model input '{names[0]}' has {len(model_shape)} dims "
                        f"{fmt_shape(model_shape)}; use .npy/.npz {role} data")
    if signature is not None and signature.by_name[names[0]].kind != "float":
        spec = signature.by_name[names[0]]
        raise DataError(f"{folder} holds images but model input '{names[0]}' is {spec.describe()}, not float; "
                        f"use .npy/.npz {role} data")
    channels = model_shape[1] if model_shape is not None and model_shape[1] in (1, 3) else 3
    assert isinstance(channels, int)
    size = target_size(image_size, model_shape, str(folder))
    _check_sample_shape(names[0], (channels, *size), model_shape, str(folder))
    return _image_chunks(files, names[0], size, per_channel(mean, 0.0, channels, "mean"),
                         per_channel(std, 1.0, channels, "std"))


def _take(chunks: Sequence[_Chunk], n: int) -> list[_Chunk]:
    """The chunks covering the first ``n`` samples, the last one cut short."""
    out: list[_Chunk] = []
    left = n
    for c in chunks:
        if left <= 0:
            break
        out.append(c if c.count <= left else dataclasses.replace(c, count=left))
        left -= c.count
    return out
