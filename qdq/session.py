"""The one place qdq builds onnxruntime sessions: optimization levels, quiet options, external data.

:func:`make_session` takes a model path, ``onnx.ModelProto`` or ``onnx_ir.Model``, optionally
appends intermediate tensors as graph outputs (``extra_outputs``, e.g. for per-layer
comparisons) and tells onnxruntime where external data lives when the model reaches it as
bytes. Load failures are one-line :class:`~qdq.errors.ModelError` messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qdq.errors import ConfigError, ModelError, first_line
from qdq.model_io import external_data_dir

__all__ = ["DEFAULT_PROVIDERS", "OPT_LEVELS", "make_session", "opt_level", "session_options"]

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
    opts.log_severity_level = 3
    return opts


def make_session(model: Any, *, level: str = "all", threads: int = 0, arena: bool = True,
                 extra_outputs: Sequence[str] = (), providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` (path, ``onnx.ModelProto`` or ``onnx_ir.Model``).

    ``extra_outputs``: names of intermediate tensors to fetch as well (appended as graph outputs;
    the input model is not modified). ``threads``: intra-op threads (0 = onnxruntime's choice).
    ``arena=False``: activations are malloc'ed and freed per run instead of kept in an arena.
    """
    opts = session_options(level)
    opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = arena
    provs = list(providers or DEFAULT_PROVIDERS)
    extra = list(dict.fromkeys(extra_outputs))
    label = f"model {model}" if isinstance(model, (str, os.PathLike)) else "model"
    try:
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise ModelError(f"model file not found: {path}")
            if not extra:
                return ort.InferenceSession(str(path), opts, providers=provs)
            try:
                proto = onnx.load(str(path), load_external_data=False)
            except Exception as exc:
                raise ModelError(f"{path} is not a readable ONNX model ({first_line(exc)})") from exc
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
