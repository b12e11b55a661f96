"""Load and save models: any of path / onnx.ModelProto / onnx_ir.Model in, atomic writes out.

Saving goes to a temporary folder beside the target and is renamed into place, so a failure
never leaves a half-written file and never touches the input. Models whose initializers
exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes are written with external data (protobuf's
2 GiB limit).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qdq.errors import ModelError, first_line

__all__ = ["load_model", "save", "to_proto", "external_data_dir", "EXTERNAL_DATA_THRESHOLD"]

logger = logging.getLogger(__name__)

#: Models whose initializers exceed this many bytes are saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

ModelLike = "str | os.PathLike[str] | onnx.ModelProto | ir.Model"




def load_model(model: Any) -> ir.Model:
    """An onnx_ir.Model from a path, ModelProto or Model (a Model is returned as is)."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        try:
            return ir.serde.deserialize_model(model)
        except Exception as exc:
            raise ModelError(f"malformed ONNX model: {first_line(exc)}") from exc
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            return ir.load(path)
        except Exception as exc:
            raise ModelError(
                f"{path} is not a readable ONNX model ({first_line(exc)}); re-export it with `qdq export`"
            ) from exc
    raise ModelError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def to_proto(model: Any) -> onnx.ModelProto:
    """The ModelProto of any supported model object."""
    if isinstance(model, onnx.ModelProto):
        return model
    return ir.serde.serialize_model(load_model(model))


def external_data_dir(model: Any) -> str | None:
    """The folder external initializers of ``model`` are read from (None if all are in memory).

    A session built from serialized bytes must be told this folder, or onnxruntime cannot
    resolve the relative external-data paths.
    """
    if not isinstance(model, ir.Model):
        return None
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            return str(value.const_value.base_dir)
    return None


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically (temp file + rename); large models get external data."""
    model = load_model(model)
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelError(f"cannot write {path}: folder {path.parent} does not exist")
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmp_dir / path.name
        if external:
            logger.info("initializers exceed %d bytes: weights go to %s", EXTERNAL_DATA_THRESHOLD, data_name)
            ir.save(model, tmp_model, external_data=data_name)
            os.replace(tmp_dir / data_name, path.parent / data_name)
        else:
            ir.save(model, tmp_model)
        os.replace(tmp_model, path)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"could not write {path}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
