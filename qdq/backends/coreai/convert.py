"""coreai-torch conversion of a lowered program to an ``AIProgram``, saved as an ``.aimodel`` asset."""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

from qdq.backends.atomic_dir import write_dir_atomically
from qdq.backends.chatter import quiet
from qdq.backends.coreai._extra import require
from qdq.backends.coreai.legalize import check_options
from qdq.backends.lowering import BackendOptions, LoweredProgram
from qdq.errors import BackendError, first_line

__all__ = ["SUFFIX", "convert", "save"]

logger = logging.getLogger(__name__)

SUFFIX = ".aimodel"


def convert(lowered: LoweredProgram, options: BackendOptions | None = None) -> Any:
    """``coreai_torch.TorchConverter`` on (a copy of) the lowered ``ExportedProgram``; returns the ``AIProgram``.

    The converter packs sub-byte weights into the program's state dict in place, so it gets a copy:
    ``lowered`` converts again (or is inspected) unchanged.
    """
    options = options or lowered.options
    check_options(options)
    coreai_torch = require("coreai_torch")
    require("coreai_torch._compression.custom_layers")
    inputs = list(options.input_names or lowered.input_names)
    outputs = list(options.output_names or lowered.output_names)
    start = time.perf_counter()
    try:
        # "cannot infer nbits" for float8 data (its dtype is the bit width), a banner and bars on stdout,
        # torch's pytree deprecations while copying the program
        with quiet("coreai_torch", stdout=True, stderr=False):
            program = copy.deepcopy(lowered.program)
            converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
            result = converter.add_exported_program(program, input_names=inputs, output_names=outputs).to_coreai()
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"coreai-torch could not convert the lowered program: {first_line(exc, with_type=True)}") \
            from exc
    logger.info("coreai-torch conversion took %.1f s", time.perf_counter() - start)
    return result


def save(lowered: LoweredProgram, path: str | os.PathLike[str], options: BackendOptions | None = None) -> Path:
    """Convert and write ``path`` (an ``.aimodel`` asset directory) atomically; returns the path."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise BackendError(f"a Core AI model is saved as an {SUFFIX} asset, not '{path.name}'; use -o model{SUFFIX}")
    program = convert(lowered, options)

    def write(staged: Path) -> None:
        try:
            program.save_asset(staged)
        except Exception as exc:
            raise BackendError(f"writing {path.name} failed: {first_line(exc, with_type=True)}") from exc

    return write_dir_atomically(path, write)
