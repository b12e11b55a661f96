"""Convert a lowered program with coremltools and write ``.mlpackage`` directories atomically."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from qdq.backends.atomic_dir import write_dir_atomically
from qdq.backends.chatter import quiet
from qdq.backends.lowering import BackendOptions, LoweredProgram
from qdq.errors import BackendError

__all__ = ["convert", "coremltools", "int4_op_names", "save"]

logger = logging.getLogger(__name__)

_DEQUANT_RANGE_ARGS = {  # op name -> index of quant_min (quant_max follows)
    "quantized_decomposed.dequantize_per_tensor": 3,
    "quantized_decomposed.dequantize_per_channel": 4,
    "torchao.dequantize_affine": 5,
}


def coremltools() -> Any:
    """``import coremltools`` with the one-line install hint when it is missing."""
    try:
        with quiet("coremltools", "torchao", "torch.utils._pytree"):  # coremltools imports torchao when present
            import coremltools as ct
    except ImportError as exc:
        raise BackendError("the coreml backend needs coremltools: pip install 'qdq[coreml]'") from exc
    return ct


def int4_op_names(program: Any) -> list[str]:
    """Names of the dequantize nodes of ``program`` declared with a 4-bit range (their MIL ops stay INT4)."""
    names = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        key = ".".join(str(node.target).split(".")[:2])
        idx = _DEQUANT_RANGE_ARGS.get(key)
        if idx is None or len(node.args) <= idx + 1:
            continue
        lo, hi = node.args[idx], node.args[idx + 1]
        if isinstance(lo, int) and isinstance(hi, int) and hi - lo <= 15:
            names.append(node.name)
    return names


def convert(lowered: LoweredProgram, options: BackendOptions | None = None) -> Any:
    """``ct.convert`` the lowered ``ExportedProgram`` to an mlprogram ``MLModel`` (not loaded on Linux).

    qdq's MIL passes run first: 8-bit weights stay INT8 at iOS18 and blocked Conv weights become one
    INT4 constexpr each (see :mod:`qdq.backends.coreml.mil_passes`).
    """
    ct = coremltools()
    from qdq.backends.coreml import mil_passes

    options = options or lowered.options  # BackendOptions checks its own target and precision
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.insert_pass(0, mil_passes.FOLD_PASS)
    pipeline.insert_pass(0, mil_passes.PIN_PASS)
    pipeline.set_options(mil_passes.PIN_PASS, {"int4_ops": ",".join(int4_op_names(lowered.program))})
    kwargs: dict[str, Any] = {}
    in_names = list(options.input_names or lowered.input_names or [])
    out_names = list(options.output_names or lowered.output_names or [])
    if in_names:
        kwargs["inputs"] = [ct.TensorType(name=n) for n in in_names]
    if out_names:
        kwargs["outputs"] = [ct.TensorType(name=n) for n in out_names]
    precision = ct.precision.FLOAT32 if options.compute_precision == "float32" else ct.precision.FLOAT16
    start = time.perf_counter()
    try:
        with quiet("coremltools"):
            mlmodel = ct.convert(
                lowered.program, convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, options.deployment_target),
                compute_precision=precision, pass_pipeline=pipeline, skip_model_load=sys.platform != "darwin",
                **kwargs,
            )
    except (ValueError, NotImplementedError, RuntimeError, KeyError, TypeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"coremltools could not convert the lowered program: {first}") from exc
    logger.info("coremltools conversion took %.1f s", time.perf_counter() - start)
    return mlmodel


def save(lowered: LoweredProgram, path: str | os.PathLike[str], options: BackendOptions | None = None) -> Path:
    """Convert and write ``path`` (a ``.mlpackage`` directory): built beside it, renamed into place.

    An existing package at ``path`` is replaced only once the new one is complete, and restored if
    the swap fails; a failed conversion leaves ``path`` untouched.
    """
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise BackendError(f"a Core ML model is saved as a .mlpackage directory, not '{path.name}'")
    mlmodel = convert(lowered, options)
    return write_dir_atomically(path, lambda staged: mlmodel.save(str(staged)))
