"""The one place qdq builds onnxruntime sessions: optimization levels, quiet options, external data.

:func:`make_session` takes a model path, ``onnx.ModelProto`` or ``onnx_ir.Model``, optionally
appends intermediate tensors as graph outputs (``extra_outputs``, e.g. for per-layer
comparisons) and tells onnxruntime where external data lives when the model reaches it as
bytes. Load failures are one-line :class:`~qdq.errors.ModelError` messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qdq.errors import ConfigError, DataError, ModelError, first_line
from qdq.model_inputs import Chunk, ModelInputs, iter_chunks, join_outputs
from qdq.model_io import external_data_dir, inline_small_external

__all__ = ["DEFAULT_PROVIDERS", "OPT_LEVELS", "iter_batched", "make_session", "opt_level", "ort_feeds", "run",
           "run_batched", "session_options"]

logger = logging.getLogger(__name__)

#: onnxruntime graph optimization levels by name ("none" keeps every node, e.g. each Q/DQ pair).
OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
#: Older spellings still accepted (qdq.validate used "disabled").
_ALIASES = {"disabled": "none"}

DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


def opt_level(level: str) -> str:
    """The canonical name of optimization ``level`` (all / extended / basic / none; "disabled" = "none")."""
    name = _ALIASES.get(level, level)
    if name not in OPT_LEVELS:
        raise ConfigError(f"onnxruntime optimization level must be one of {', '.join(OPT_LEVELS)} "
                          f"(or 'disabled'), got {level!r}")
    return name


def session_options(level: str = "all") -> ort.SessionOptions:
    """Quiet session options at optimization ``level`` (all / extended / basic / none)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVELS[opt_level(level)]
    opts.log_severity_level = 4  # fatal only: qdq reports onnxruntime's errors itself, as one line
    return opts


def make_session(model: Any, *, level: str = "all", threads: int = 0, arena: bool = True,
                 extra_outputs: Sequence[str] = (), providers: Sequence[str] | None = None,
                 label: str | None = None) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` (path, ``onnx.ModelProto`` or ``onnx_ir.Model``).

    ``extra_outputs``: names of intermediate tensors to fetch as well (appended as graph outputs;
    the input model is not modified). ``threads``: intra-op threads (0 = onnxruntime's choice).
    ``arena=False``: activations are malloc'ed and freed per run instead of kept in an arena.
    ``label`` names the model in errors (e.g. "quantized model").
    """
    if label is None:
        label = f"model {model}" if isinstance(model, (str, os.PathLike)) else "model"
    if opt_level(level) in ("extended", "all") and _float8_activation_pairs(model):
        # onnxruntime 1.32's extended QDQ fusions mis-run float8 activation Q/DQ pairs on CPU (a prepared fp8
        # digits CNN: 24.5 dB at "basic", -6.8 dB at "extended"); qdq's finalize rewrites them as casts, so only
        # prepared (not finalized) models get here
        logger.debug("the %s has float8 activation Q/DQ pairs: onnxruntime runs it at level basic", label)
        level = "basic"
    try:
        return _load(model, session_options(level), threads, arena, extra_outputs, providers, label)
    except ModelError as exc:
        if level in ("none", "disabled") or "/optimizer/" not in str(exc):
            raise
        # onnxruntime's own graph optimizer failed on a valid model (e.g. 1.32's ClipQuantFusion on float8 zero
        # points): the model still runs, unoptimized
        logger.warning("onnxruntime's graph optimizer failed on the %s (%s); running it unoptimized", label,
                       str(exc).split(": ", 1)[-1][:200])
        return _load(model, session_options("none"), threads, arena, extra_outputs, providers, label)


_FLOAT8 = frozenset({onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
                     onnx.TensorProto.FLOAT8E5M2FNUZ})


def _float8_activation_pairs(model: Any) -> bool:
    """Whether an in-memory model quantizes a computed tensor to float8 (paths are not opened for this)."""
    if isinstance(model, ir.Model):
        return any(n.op_type == "QuantizeLinear" and n.inputs[0] is not None and n.inputs[0].const_value is None
                   and len(n.inputs) > 2 and n.inputs[2] is not None and n.inputs[2].dtype is not None
                   and int(n.inputs[2].dtype) in _FLOAT8 for n in model.graph)
    if isinstance(model, onnx.ModelProto):
        types = {t.name: t.data_type for t in model.graph.initializer}
        return any(n.op_type == "QuantizeLinear" and n.input[0] not in types and len(n.input) > 2
                   and types.get(n.input[2]) in _FLOAT8 for n in model.graph.node)
    return False


def _load(model: Any, opts: ort.SessionOptions, threads: int, arena: bool, extra_outputs: Sequence[str],
          providers: Sequence[str] | None, label: str) -> ort.InferenceSession:
    opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = arena
    provs = list(providers or DEFAULT_PROVIDERS)
    extra = list(dict.fromkeys(extra_outputs))
    try:
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise ModelError(f"{'model file' if label.startswith('model ') else label} not found: {path}")
            if not extra:
                try:
                    return ort.InferenceSession(str(path), opts, providers=provs)
                except Exception as exc:
                    if "external tensors" not in str(exc):
                        raise
                    # a shape-like constant (axes, pads) saved outside: read the small ones in, as load_model does
            try:
                proto = onnx.load(str(path), load_external_data=False)
            except Exception as exc:
                raise ModelError(f"{path} is not a readable ONNX model ({first_line(exc)})") from exc
            inline_small_external(proto, path.parent)
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
            return ort.InferenceSession(_with_outputs(proto, extra, label), opts, providers=provs)
        if isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(_with_outputs(model, extra, label), opts, providers=provs)
        if isinstance(model, ir.Model):
            folder = external_data_dir(model)
            if folder is not None:
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            # The proto is freed before the session copies the weights.
            blob = _with_outputs(ir.serde.serialize_model(model), extra, label)
            return ort.InferenceSession(blob, opts, providers=provs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the {label}: {first_line(exc)}") from exc
    raise ModelError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def ort_feeds(feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``feeds`` as onnxruntime's ``run`` takes them: bfloat16 arrays (ml_dtypes) become OrtValues."""
    out: dict[str, Any] = {}
    for name, x in feeds.items():
        if x.dtype.name == "bfloat16":  # onnxruntime's numpy bridge has no bfloat16: pass the raw bits
            out[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(x).view(np.uint16), onnx.TensorProto.BFLOAT16)
        else:
            out[name] = x
    return out


def run(session: ort.InferenceSession, fetch: Sequence[str] | None, feeds: Mapping[str, np.ndarray], *,
        start: int = 0, where: str = "the batch") -> list[np.ndarray]:
    """``session.run`` with onnxruntime's failures as one DataError line naming the batch and its shapes.

    Inputs were checked against the model already, so what fails here is data the graph rejects
    (an id outside an embedding table, a shape a Reshape cannot take).
    """
    try:
        return session.run(None if fetch is None else list(fetch), ort_feeds(feeds))
    except Exception as exc:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in feeds.items())
        raise DataError(f"onnxruntime failed on {where} at sample {start} ({shapes}): {first_line(exc)}; "
                        "check the data matches the model inputs") from exc


def iter_batched(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], inputs: ModelInputs,
                 fetch: Sequence[str] | None = None, *, step: int | None = None,
                 start: int = 0) -> Iterator[tuple[Chunk, list[np.ndarray]]]:
    """Run checked ``feeds`` in runs of the model's static batch (or of ``step`` samples for a dynamic one),
    yielding each run's chunk and outputs, padding copies dropped: a caller that reduces the outputs run by run
    never holds a whole batch of them."""
    names = [o.name for o in session.get_outputs()] if fetch is None else list(fetch)
    for chunk in iter_chunks(feeds, inputs, step):
        outs = run(session, names, chunk.feeds, start=start + chunk.start)
        yield chunk, [chunk.unpad(o) for o in outs]


def run_batched(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], inputs: ModelInputs,
                fetch: Sequence[str] | None = None, *, start: int = 0) -> list[np.ndarray]:
    """Run checked ``feeds`` (see :meth:`ModelInputs.feeds`) in runs of the model's static batch.

    A short remainder is padded with copies of real samples; the copies are dropped from the
    outputs (where an output's dim 0 is the batch), which are joined along dim 0.
    """
    names = [o.name for o in session.get_outputs()] if fetch is None else list(fetch)
    return join_outputs(names, list(iter_batched(session, feeds, inputs, names, start=start)))


def _with_outputs(proto: onnx.ModelProto, extra: Sequence[str], label: str) -> bytes:
    """``proto`` serialized with ``extra`` appended as graph outputs (the proto is left as it was)."""
    original = [o.name for o in proto.graph.output]
    added = [n for n in extra if n not in original]
    # Outputs without type or shape: onnxruntime infers both, so no shape inference is needed.
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in added)
    try:
        return proto.SerializeToString()
    except ValueError as exc:
        raise ModelError(f"the {label} is over 2 GiB in memory; save it with external data and pass the path") from exc
    finally:
        del proto.graph.output[len(original):]
