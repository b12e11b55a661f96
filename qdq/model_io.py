"""Load and save models: any of path / onnx.ModelProto / onnx_ir.Model in, atomic writes out.

Loading checks the model before anything else (:mod:`qdq.model_check`): an empty, truncated or
invalid file, a dangling tensor or bad external data is one named :class:`ModelError`.

Saving writes the model (and its external data) under temporary names in the target folder,
then renames the data file and finally the model into place, so a failure or an interrupt never
leaves a half-written file, keeps the previous files intact and never touches the input. Models
whose initializers exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes are written with external data
(protobuf's 2 GiB limit); a stale ``<name>.data`` of an earlier save of the same name is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_tensor

from qdq.errors import ModelError, first_line
from qdq.model_check import check_proto, expected_bytes

__all__ = ["EXTERNAL_DATA_THRESHOLD", "check_output_path", "external_data_dir", "inline_small_external", "load_model", "save",
           "to_proto"]

logger = logging.getLogger(__name__)

#: Models whose initializers exceed this many bytes are saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# directory artifacts of the torch-program backends (suffix -> backend), written by their own save()
_DIR_ARTIFACTS = {".mlpackage": "coreml", ".aimodel": "coreai"}

ModelLike = "str | os.PathLike[str] | onnx.ModelProto | ir.Model"


def _read_proto(path: Path) -> onnx.ModelProto:
    """The proto of the file at ``path`` (external data not loaded), or a ModelError saying why not."""
    if not path.exists():
        raise ModelError(f"model file not found: {path} does not exist")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not an ONNX model file; pass the .onnx file inside it")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes): not an ONNX model; re-export it (qdq export)")
    try:
        return onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise ModelError(f"{path} is not a readable ONNX model: truncated or not an ONNX file "
                         f"({size} bytes; {first_line(exc)}); re-export it with `qdq export`") from exc
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {first_line(exc)}") from exc


def load_model(model: Any) -> ir.Model:
    """An onnx_ir.Model from a path, ModelProto or Model (a Model is returned as is).

    Paths and protos are checked first (:func:`qdq.model_check.check_proto`).
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        check_proto(model, source="the model", base_dir=None)
        try:
            return ir.serde.deserialize_model(model)
        except Exception as exc:
            raise ModelError(f"malformed ONNX model: {first_line(exc)}") from exc
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = _read_proto(path)
        check_proto(proto, source=str(path), base_dir=path.parent, path=path)
        inline_small_external(proto, path.parent)
        try:
            loaded = ir.serde.deserialize_model(proto)
        except Exception as exc:
            raise ModelError(f"{path} is not a readable ONNX model ({first_line(exc)}); re-export it") from exc
        ir.external_data.set_base_dir(loaded.graph, str(path.parent))
        return loaded
    raise ModelError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


#: External tensors up to this size are read into memory at load: shape inference (onnxruntime's included)
#: needs the values of shape-like constants (axes, pads, target shapes), which some savers put outside.
INLINE_EXTERNAL_MAX_BYTES = 4096


def inline_small_external(proto: onnx.ModelProto, base_dir: str | os.PathLike[str]) -> None:
    """Read the small external initializers of ``proto`` (see :data:`INLINE_EXTERNAL_MAX_BYTES`) into it, in place."""
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        size = int(info["length"]) if info.get("length") else expected_bytes(tensor)
        if size is not None and size <= INLINE_EXTERNAL_MAX_BYTES:
            load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


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


def _inline_external(model: ir.Model) -> ir.Model:
    """``model`` with every external initializer in memory (a clone when there are any; the input is kept)."""
    if not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return model
    clone = model.clone()
    ir.external_data.load_to_model(clone)
    return clone


def _old_data_file(path: Path, data_name: str) -> Path | None:
    """``<name>.data`` beside ``path`` if the model now at ``path`` reads it (a file an earlier save wrote)."""
    data = path.parent / data_name
    if not (path.is_file() and data.is_file()):
        return None
    try:
        old = onnx.load(path, load_external_data=False)
    except (OSError, DecodeError, RuntimeError, ValueError):  # an unreadable old file references nothing
        return None
    for tensor in old.graph.initializer:
        if any(e.key == "location" and os.path.normpath(e.value) == data_name for e in tensor.external_data):
            return data
    return None


def save(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically; large models get external data (``<name>.data``).

    A Core ML / Core AI :class:`~qdq.backends.artifact.BackendArtifact` (what ``finalize(backend=...)``
    returns) is converted and written as its ``.mlpackage`` / ``.aimodel`` directory, also atomically.

    Both files are written under temporary names in the target folder, then the data file and
    finally the model are renamed into place. On any failure (or Ctrl-C) the previous files at
    ``path`` are restored and no temporary file is left.
    """
    if hasattr(model, "exported_program") and hasattr(model, "save"):  # a BackendArtifact
        return Path(model.save(path))
    if Path(path).suffix in _DIR_ARTIFACTS:
        raise ModelError(f"cannot write an ONNX model as {Path(path).name}: {Path(path).suffix} is a "
                         f"{_DIR_ARTIFACTS[Path(path).suffix]} model; finalize with backend="
                         f"{_DIR_ARTIFACTS[Path(path).suffix]!r} first, or save as .onnx")
    model = load_model(model)
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise ModelError(f"cannot write {path}: folder {folder} does not exist; create it or choose another path")
    if path.is_dir():
        raise ModelError(f"cannot write {path}: it is a directory; give a file name such as {path / 'model.onnx'}")
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    data_path = folder / data_name
    stale = _old_data_file(path, data_name)
    token = secrets.token_hex(4)
    try:
        tmp_dir = folder / f".{path.name}.{token}.tmp"
        tmp_dir.mkdir()
    except OSError as exc:
        raise ModelError(f"cannot write {path}: folder {folder} is not writable ({first_line(exc)}); "
                         "choose another output folder") from exc
    backup = folder / f".{data_name}.{token}.bak"
    moved_data = backed_up = False
    try:
        tmp_model = tmp_dir / path.name
        if external:
            logger.info("initializers exceed %d bytes: weights go to %s", EXTERNAL_DATA_THRESHOLD, data_name)
            ir.save(model, tmp_model, external_data=data_name)
        else:
            ir.save(_inline_external(model), tmp_model)
        if external:
            if data_path.exists():
                os.replace(data_path, backup)
                backed_up = True
            os.replace(tmp_dir / data_name, data_path)
            moved_data = True
        os.replace(tmp_model, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if moved_data:
                data_path.unlink()
            if backed_up:
                os.replace(backup, data_path)
        if isinstance(exc, ModelError) or not isinstance(exc, Exception):
            raise
        raise ModelError(f"could not write {path}: {first_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        if backed_up:
            backup.unlink()
        if stale is not None and not external:
            stale.unlink()
            logger.info("removed %s, the external data of the model this save replaced", stale)
    return path


def check_output_path(path: str | os.PathLike[str], *, inputs: Any = ()) -> Path:
    """Check, before any work, that ``path`` can be written and is none of ``inputs`` (ConfigError if not).

    ``inputs`` are files qdq reads (the model, its external data): an output that names one of them
    under any spelling, symlink or hard link is refused, as is an output whose ``<name>.data`` would.
    """
    from qdq.errors import ConfigError

    out = Path(path)
    folder = out.parent
    if out.is_dir() and out.suffix not in _DIR_ARTIFACTS:
        raise ConfigError(f"-o {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if not folder.exists():
        raise ConfigError(f"output folder {folder} does not exist; create it (mkdir -p {folder}) or choose another -o")
    if not folder.is_dir():
        raise ConfigError(f"cannot write -o {out}: {folder} is a file, not a folder; choose another -o")
    for src in inputs:
        src = Path(src)
        for mine in (out, folder / (out.name + ".data")):
            same = mine.resolve() == src.resolve()
            if not same and mine.exists() and src.exists():
                same = os.path.samefile(mine, src)
            if same:
                raise ConfigError(f"-o {out} would overwrite the input {src}; qdq never modifies its input: "
                                  "choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write to output folder {folder} ({first_line(exc)}); choose another -o") from exc
    os.close(fd)
    os.unlink(probe)
    return out


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically (a temporary file in the same folder, renamed into place; umask modes)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users / a web server
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
