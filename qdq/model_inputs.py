"""Model input signatures: each graph input's name, element type and shape, read from the model.

Calibration, ``prepare(example)``, ``Quantizer.run``, :func:`qdq.compare` and the data sources
feed a model what it declares: float data in the input's float type (float16 model -> float16
feeds), integer and bool inputs (token ids, masks, positions) unchanged or converted losslessly.
A batch that cannot match (unknown or missing input, wrong dtype kind, rank or static dim) is
one :class:`~qdq.errors.DataError` line naming the input, what it got and what it expects,
raised before any session runs.

A *static batch* (every required input's first dim is the same fixed N) is honoured by running
in chunks of N, see :func:`iter_chunks`: a batch-1 export runs sample by sample.

An *unbatched* input has no sample axis: a scalar, or a fixed-shape input beside inputs whose batch it does not
share (a ``pads`` vector ``(8,)`` next to images ``(N, 3, H, W)``). It is fed whole, the same value with every
run (:attr:`ModelInputs.unbatched`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qdq.errors import DataError, ModelError, first_line

__all__ = ["Chunk", "Dim", "InputSpec", "ModelInputs", "first_samples", "fits", "fmt_shape", "is_float", "iter_chunks", "join_outputs", "model_inputs"]

logger = logging.getLogger(__name__)

#: A model dim: int when fixed, its symbolic name (str) or None when dynamic.
Dim = int | str | None

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_INT_TYPES = {ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT8,
              ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64}


def fmt_shape(shape: Sequence[Any] | None) -> str:
    """``(N, 3, 224, 224)``: dynamic dims by name, ``?`` when unnamed; ``(?)`` for an unknown rank."""
    if shape is None:
        return "(any shape)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input. ``optional``: it has an initializer of the same name (a default value)."""

    name: str
    elem_type: ir.DataType
    shape: tuple[Dim, ...] | None  #: None when the rank is unknown
    optional: bool = False

    @property
    def kind(self) -> str:
        """``float``, ``int``, ``bool`` or ``other`` (strings, complex, ...)."""
        if self.elem_type in _FLOAT_TYPES:
            return "float"
        if self.elem_type in _INT_TYPES:
            return "int"
        return "bool" if self.elem_type == ir.DataType.BOOL else "other"

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype fed to onnxruntime (ml_dtypes.bfloat16 for bfloat16)."""
        return np.dtype(self.elem_type.numpy())

    def describe(self) -> str:
        return f"{self.dtype.name} {fmt_shape(self.shape)}"


class ModelInputs(Sequence[InputSpec]):
    """The inputs of one model, in graph order, with the checks and conversions that feed them."""

    def __init__(self, specs: Sequence[InputSpec]) -> None:
        self.specs = list(specs)
        self.by_name = {s.name: s for s in self.specs}
        #: inputs that must be fed (no default initializer)
        self.required = [s for s in self.specs if not s.optional]
        #: required inputs with no sample axis, fed whole with every run (see :func:`_unbatched`)
        self.unbatched = _unbatched(self.required)
        self.static_batch = _static_batch([s for s in self.required if s.name not in self.unbatched])

    def __getitem__(self, i: Any) -> Any:
        return self.specs[i]

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        body = ", ".join(f"{s.name}: {s.describe()}{'?' if s.optional else ''}" for s in self.specs)
        return f"ModelInputs({body})"

    @property
    def names(self) -> list[str]:
        """Every input name (optional ones included), in graph order."""
        return [s.name for s in self.specs]

    @property
    def required_names(self) -> list[str]:
        return [s.name for s in self.required]

    def shapes(self) -> dict[str, tuple[Dim, ...] | None]:
        """Input shapes by name (for :func:`qdq.data.open_data`'s ``input_shapes``)."""
        return {s.name: s.shape for s in self.specs}

    def expected(self) -> str:
        return ", ".join(self.required_names + [f"{s.name} (optional)" for s in self.specs if s.optional])

    # ------------------------------------------------------------------ checks
    def check_names(self, names: Sequence[str], where: str = "the batch") -> None:
        """Every required input present, no name the model does not take."""
        unknown = [n for n in names if n not in self.by_name]
        missing = [s for s in self.required if s.name not in names]
        if unknown or missing:
            what = (f"has no array for model input '{missing[0].name}' ({missing[0].describe()})" if missing
                    else f"has '{unknown[0]}', which is not a model input")
            raise DataError(f"{where} {what}: data has inputs ({', '.join(map(str, names))}) but the model expects "
                            f"({self.expected()}); name the arrays after the model inputs")

    def check_array(self, name: str, dtype: np.dtype, shape: Sequence[int], where: str = "the batch", *,
                    batched: bool = True) -> None:
        """Dtype kind, rank and static dims of data for input ``name`` (values are checked by :meth:`convert`).

        ``batched``: ``shape`` has the leading batch dim (else it is one sample). With a static
        model batch the leading dim may be anything: batches run in chunks of the model's batch.
        """
        spec = self.by_name[name]
        kind = _kind(np.dtype(dtype))
        if kind not in "biuf":
            raise DataError(f"{where}: input '{name}' got {np.dtype(dtype)} data but the model expects "
                            f"{spec.describe()}; save numbers")
        if spec.kind == "other":
            raise DataError(f"{where}: model input '{name}' is {spec.elem_type.name}; qdq feeds numeric inputs only")
        if spec.shape is None:
            return
        full = tuple(shape) if batched else (None, *shape)
        if name in self.unbatched and not fits(shape, spec.shape):
            raise DataError(f"{where}: input '{name}' has no batch axis (model shape {fmt_shape(spec.shape)}): it takes "
                            f"one value for the whole run, but got {fmt_shape(tuple(shape))}; pass that one "
                            f"{fmt_shape(spec.shape)} value with every batch")
        if len(full) != len(spec.shape):
            got = fmt_shape(full) if batched else f"samples of {fmt_shape(tuple(shape))}"
            raise DataError(f"{where}: input '{name}' got {len(full)} dims {got} but the model expects "
                            f"{len(spec.shape)} {fmt_shape(spec.shape)}; give it arrays of the model input's rank")
        for i, (got_d, want) in enumerate(zip(full, spec.shape)):
            if got_d is None or not isinstance(want, int) or want <= 0 or got_d == want:
                continue
            if i == 0 and self.static_batch is not None and not spec.optional:
                continue  # any number of samples: run in chunks of the model's batch
            got = (f"shape {fmt_shape(full)}" if batched else
                   f"one sample of shape {fmt_shape(tuple(shape))} (an array with one dim fewer than the input is "
                   f"read as a single sample)")
            raise DataError(f"{where}: input '{name}' got {got} but the model expects "
                            f"{spec.describe()} (dim {i} must be {want}); resize or re-save the data")

    def convert(self, name: str, x: Any, where: str = "the batch") -> np.ndarray:
        """``x`` as the C-contiguous array onnxruntime takes for input ``name`` (checked, converted losslessly)."""
        spec = self.by_name[name]
        arr = _to_numpy(x)
        self.check_array(name, arr.dtype, arr.shape, where)
        want = spec.dtype
        if arr.dtype == want:
            return np.asarray(arr, order="C")  # (np.ascontiguousarray makes a scalar 1-d)
        if spec.kind == "float":
            if want.name == "bfloat16" and _kind(arr.dtype) != "f":
                arr = arr.astype(np.float32)  # ml_dtypes casts bfloat16 from floats only
            return np.asarray(arr.astype(want), order="C")
        if spec.kind == "bool":
            if arr.dtype.kind != "b" and arr.size and not np.isin(arr, (0, 1)).all():
                raise DataError(f"{where}: input '{name}' is a bool mask but the data ({arr.dtype}) holds values "
                                "other than 0/1; save the mask as bool or 0/1")
            return np.asarray(arr.astype(bool), order="C")
        # integer input: ids, masks, positions
        if _kind(arr.dtype) == "f":
            arr = arr.astype(np.float64) if arr.dtype.kind != "f" else arr
            finite = np.isfinite(arr).all()
            if not finite or (arr.size and not np.array_equal(arr, np.round(arr))):
                bad = arr[~np.isfinite(arr)] if not finite else arr[arr != np.round(arr)]
                raise DataError(f"{where}: input '{name}' expects integers ({spec.describe()}) but got {arr.dtype} "
                                f"values like {bad.flat[0]!r}; save the ids/mask as integers")
        if arr.size and arr.dtype.kind != "b":
            info = np.iinfo(want)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise DataError(f"{where}: input '{name}' ({spec.describe()}) got values in [{lo}, {hi}], outside "
                                f"{want.name}; check the data")
        return np.asarray(arr.astype(want), order="C")

    def feeds(self, batch: Any, where: str = "the batch", *, known_only: bool = False) -> dict[str, np.ndarray]:
        """Normalise a batch (array, tuple/list in input order, dict by name, torch tensors) to checked feeds.

        A tuple maps to the required inputs (or to every input when it has that many). Optional
        inputs may be left out; missing required inputs, unknown names, mismatched dtype kinds,
        ranks or static dims raise one DataError line. ``known_only``: a dict's names this model does not take
        are dropped (another model's feeds: a quantized model froze a default-valued input as a weight).
        """
        if isinstance(batch, Mapping) and known_only:
            batch = {k: v for k, v in batch.items() if k in self.by_name}
        if isinstance(batch, Mapping):
            names = [str(k) for k in batch]
            self.check_names(names, where)
            items = [(n, batch[n]) for n in self.names if n in batch]
        else:
            values = list(batch) if isinstance(batch, (tuple, list)) else [batch]
            targets = self.specs if len(values) == len(self.specs) else self.required
            if len(values) != len(targets):
                raise DataError(f"{where} has {len(values)} arrays but the model takes {len(self.required)} inputs "
                                f"({self.expected()}); pass one array per input, or a dict by input name")
            items = [(s.name, v) for s, v in zip(targets, values)]
        feeds = {name: self.convert(name, x, where) for name, x in items}
        if self.static_batch is not None and feeds:
            sizes = {v.shape[0] for n, v in feeds.items() if self.is_batched(n, v)}
            if len(sizes) > 1:
                detail = ", ".join(f"{n}: {v.shape[0]}" for n, v in feeds.items() if self.is_batched(n, v))
                raise DataError(f"{where}: inputs have different numbers of samples ({detail}); give every input "
                                "the same number")
        return feeds

    def batch_len(self, feeds: Mapping[str, np.ndarray]) -> int | None:
        """Samples in ``feeds``: the common first dim of the required inputs of rank >= 1 (None if unknown)."""
        sizes = {v.shape[0] for n, v in feeds.items() if self.is_batched(n, v)}
        return sizes.pop() if len(sizes) == 1 else None

    def is_batched(self, name: str, x: np.ndarray) -> bool:
        """Whether feed ``name`` is stacked by sample: a required input of rank >= 1 that has a sample axis."""
        spec = self.by_name.get(name)
        return bool(x.ndim) and spec is not None and not spec.optional and name not in self.unbatched

    def split(self, feeds: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``start:stop`` of ``feeds``: arrays with the batch's sample axis sliced, unbatched inputs as they are."""
        n = self.batch_len(feeds)
        return {k: v[start:stop] if v.ndim and v.shape[0] == n and k not in self.unbatched else v
                for k, v in feeds.items()}


def fits(shape: Sequence[int], model_shape: Sequence[Dim]) -> bool:
    """``shape`` has the model shape's rank and its fixed dims (dynamic ones match anything)."""
    return len(shape) == len(model_shape) and all(not isinstance(w, int) or w == d for d, w in zip(shape, model_shape))


def is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a float type, ml_dtypes' bfloat16/float8 included."""
    return _kind(np.dtype(dtype)) == "f"


def _kind(dtype: np.dtype) -> str:
    """numpy's dtype kind, with ml_dtypes' bfloat16/float8 (kind "V") counted as float."""
    return "f" if dtype.kind == "V" and "float" in dtype.name else dtype.kind


def _unbatched(required: Sequence[InputSpec]) -> set[str]:
    """Required inputs with no sample axis: rank 0, and fixed-shape inputs beside a batch axis they cannot share.

    When some input's first dim is dynamic, every input whose first dim is fixed is unbatched (it cannot grow
    with the batch: ``position_ids (1, S)`` beside ``input_ids (N, S)``). When every first dim is fixed but they
    differ, the batch is the first input's first dim (``input_ids (1, 8)`` beside a layers-first cache
    ``(4, 1, 8, 16)``, or an image ``(1, 4, 8, 8)`` beside ``gamma (4, 1, 1)``: batch 1); inputs whose first dim
    differs are unbatched.
    """
    out = {s.name for s in required if s.shape == ()}
    ranked = [s for s in required if s.shape]
    if not ranked:
        return out
    if any(not (isinstance(s.shape[0], int) and s.shape[0] >= 0) for s in ranked):  # type: ignore[index]
        # a fixed first dim cannot grow with the batch: position_ids (1, S) beside input_ids (N, S)
        return out | {s.name for s in ranked if isinstance(s.shape[0], int) and s.shape[0] >= 0}  # type: ignore[index]
    firsts = [s.shape[0] for s in ranked]  # type: ignore[index]
    if len(set(firsts)) > 1:
        # the first input is the data (x, input_ids): its first dim is the batch; side inputs (a cache, norm
        # parameters, rotary tables) are fed whole. A zero-size input is never the batch.
        batch = next((d for d in firsts if d), firsts[0])
        out |= {s.name for s, d in zip(ranked, firsts) if d != batch}
    return out


def _static_batch(required: Sequence[InputSpec]) -> int | None:
    """The fixed first dim shared by every required input of rank >= 1, else None (dynamic or mixed)."""
    firsts = [s.shape[0] for s in required if s.shape]
    if firsts and all(isinstance(d, int) and d > 0 for d in firsts) and len(set(firsts)) == 1:
        return int(firsts[0])  # type: ignore[arg-type]
    return None


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        t = x.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            t = t.float()
        return np.asarray(t.numpy())
    try:
        return np.asarray(x)
    except Exception as exc:
        raise DataError(f"cannot read a {type(x).__name__} as an array ({first_line(exc)}); pass numpy arrays") from exc


# ----------------------------------------------------------------------------- reading signatures


def _dims(shape: ir.Shape | None) -> tuple[Dim, ...] | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in shape)


def _proto_dims(vi: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


def model_inputs(model: Any) -> ModelInputs:
    """The input signature of ``model`` (path, ``onnx.ModelProto``, ``onnx_ir.Model`` or a ModelInputs)."""
    if isinstance(model, ModelInputs):
        return model
    if isinstance(model, ir.Model):
        graph = model.graph
        specs = []
        for v in graph.inputs:
            if v.dtype is None:
                raise ModelError(f"model input '{v.name}' has no element type; re-export the model")
            specs.append(InputSpec(v.name or "", v.dtype, _dims(v.shape), optional=(v.name in graph.initializers)))
        return ModelInputs(specs)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ModelError(f"{path} is not a readable ONNX model ({first_line(exc)})") from exc
    if isinstance(model, onnx.ModelProto):
        inits = {t.name for t in model.graph.initializer}
        specs = []
        for vi in model.graph.input:
            elem = vi.type.tensor_type.elem_type
            if not elem:
                raise ModelError(f"model input '{vi.name}' is not a tensor with an element type; re-export the model")
            specs.append(InputSpec(vi.name, ir.DataType(elem), _proto_dims(vi), optional=vi.name in inits))
        return ModelInputs(specs)
    raise ModelError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


# ----------------------------------------------------------------------------- static batches


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One onnxruntime run of a static-batch model: ``feeds`` hold ``real`` samples, padded to the model batch."""

    feeds: dict[str, np.ndarray]
    start: int
    real: int
    padded: int  #: samples in ``feeds`` (the model's batch, or ``real`` when nothing was padded)

    def unpad(self, x: np.ndarray) -> np.ndarray:
        """A run's tensor without the padding copies (when its dim 0 is the batch; a 0-d or unbatched one as is)."""
        return x[:self.real] if self.real != self.padded and x.ndim and x.shape[0] == self.padded else x


def iter_chunks(feeds: Mapping[str, np.ndarray], inputs: ModelInputs, step: int | None = None) -> Iterator[Chunk]:
    """Split ``feeds`` into runs of the model's static batch (or of ``step`` samples for a dynamic batch).

    An empty batch yields nothing. A short remainder of a static batch N is padded with copies of
    its own samples (cycled), so every run holds N samples; :attr:`Chunk.real` says how many are real (outputs and count-sensitive
    statistics drop the rest). Without a static batch or ``step`` the feeds run whole.
    """
    n = inputs.batch_len(feeds)
    if n == 0:
        return  # an empty batch: nothing to run
    size = inputs.static_batch or step
    if n is None or size is None or (n == size) or (inputs.static_batch is None and n <= size):
        yield Chunk(dict(feeds), 0, n or 1, n or 1)
        return
    batched = {k for k, v in feeds.items() if inputs.is_batched(k, v) and v.shape[0] == n}
    for start in range(0, n, size):
        real = min(size, n - start)
        part = {k: (v[start:start + real] if k in batched else v) for k, v in feeds.items()}
        if inputs.static_batch is not None and real < size:
            idx = np.arange(size) % real
            part = {k: (np.ascontiguousarray(v[idx]) if k in batched else v) for k, v in part.items()}
            yield Chunk(part, start, real, size)
        else:
            yield Chunk(part, start, real, real)


def first_samples(batches: Iterable[Any], inputs: ModelInputs, count: int) -> Iterator[dict[str, np.ndarray]]:
    """Checked feeds of the first ``count`` samples of ``batches`` (all of them when ``count`` is 0), the last
    batch cut short; streamed, so nothing past them is read."""
    seen = 0
    for batch in batches:
        feeds = inputs.feeds(batch, "calibration batch")
        n = inputs.batch_len(feeds) or 1
        take = n if not count else min(n, count - seen)
        yield inputs.split(feeds, 0, take)
        seen += take
        if count and seen >= count:
            return


def join_outputs(names: Sequence[str], parts: Sequence[tuple[Chunk, list[np.ndarray]]]) -> list[np.ndarray]:
    """The outputs of a batch run in several chunks (padding already dropped), joined along dim 0."""
    if len(parts) == 1:
        return parts[0][1]
    joined = []
    for i, name in enumerate(names):
        pieces = [outs[i] for _, outs in parts]
        if not all(p.ndim and p.shape[0] == c.real for (c, _), p in zip(parts, pieces)):
            raise DataError(f"model output '{name}' (shape {pieces[0].shape}) has no sample axis, so the "
                            f"{len(parts)} runs of this batch cannot be joined; pass batches of "
                            f"{parts[0][0].padded} samples")
        joined.append(np.concatenate(pieces, axis=0))
    return joined
