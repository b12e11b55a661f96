"""``finalize(backend=CoreML | CoreAI)``: a prepared QDQ model legalized, lowered to a torch program, converted on save.

:func:`finalize_for_backend` runs the stages of a torch-program backend in order:

1. **legalize** (the backend's ``legalize``): refuse what its converter cannot take, rewrite what it can
   take another way (each rewrite is a :class:`~qdq.backends.lowering.LegalizationNote`);
2. **fold** Relu / Clip before a Q where the Q's range makes them redundant (exact, as for onnxruntime);
3. **lower** (:func:`qdq.backends.torch_program.lower`): integer weights and the backend's Q/DQ ops in a
   ``torch.export`` program.

The :class:`BackendArtifact` it returns carries the ``ExportedProgram`` (for users who call coremltools or
coreai-torch themselves), the eager module it was traced from and the notes; ``save("m.mlpackage")`` /
``save("m.aimodel")`` converts with the real converter and writes atomically.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx_ir as ir

from qdq.backends.capabilities import ExportBackend, check_plan
from qdq.backends.lowering import DEPLOYMENT_TARGETS, BackendOptions, LegalizationNote, LoweredProgram
from qdq.errors import BackendError, ConfigError, first_line
from qdq.model_io import load_model
from qdq.plan import QuantPlan

__all__ = ["SUFFIXES", "BackendArtifact", "backend_module", "backend_options", "check_backend_plan",
           "check_suffix", "finalize_for_backend", "is_torch_backend", "require_converter"]

_MODULES = {ExportBackend.CoreML: "qdq.backends.coreml", ExportBackend.CoreAI: "qdq.backends.coreai"}
SUFFIXES = {ExportBackend.ONNXRuntime: ".onnx", ExportBackend.CoreML: ".mlpackage", ExportBackend.CoreAI: ".aimodel"}


def is_torch_backend(backend: Any) -> bool:
    """True for the backends finalized through a torch program (Core ML, Core AI)."""
    return ExportBackend.parse(backend) in _MODULES


def backend_module(backend: Any) -> ModuleType:
    """``qdq.backends.coreml`` / ``qdq.backends.coreai`` (OPS, legalize_plan, legalize, convert, save, inspect)."""
    backend = ExportBackend.parse(backend)
    if backend not in _MODULES:
        raise BackendError(f"{backend.value} is finalized as an ONNX model, not through a torch program")
    return importlib.import_module(_MODULES[backend])


def backend_options(options: BackendOptions | None = None, *, deployment_target: str | None = None,
                    compute_precision: str | None = None, input_names: Any = None, output_names: Any = None,
                    dynamic_batch: bool | None = None) -> BackendOptions:
    """:class:`BackendOptions` with the given fields replaced and checked (ConfigError naming the choices)."""
    options = options or BackendOptions()
    changes: dict[str, Any] = {}
    if deployment_target is not None:
        target = str(deployment_target)  # case-insensitive; BackendOptions names the choices otherwise
        changes["deployment_target"] = next((t for t in DEPLOYMENT_TARGETS if t.lower() == target.lower()), target)
    if compute_precision is not None:
        changes["compute_precision"] = str(compute_precision).lower().replace("fp", "float")
    for field, names in (("input_names", input_names), ("output_names", output_names)):
        if names is not None:
            seq = tuple(n.strip() for n in (names.split(",") if isinstance(names, str) else names))
            if not seq or any(not n for n in seq) or len(set(seq)) != len(seq):
                raise ConfigError(f"{field.replace('_', ' ')} must be distinct non-empty names, got {list(seq)}")
            changes[field] = seq
    if dynamic_batch is not None:
        changes["dynamic_batch"] = bool(dynamic_batch)
    return dataclasses.replace(options, **changes)


def require_converter(backend: Any) -> None:
    """BackendError naming the extra to install when ``backend``'s converter (coremltools / coreai-torch) is missing."""
    backend = ExportBackend.parse(backend)
    if backend is ExportBackend.CoreML:
        from qdq.backends.coreml.convert import coremltools

        coremltools()
    elif backend is ExportBackend.CoreAI:
        from qdq.backends.coreai._extra import require

        require("coreai_torch")


def check_suffix(path: str | os.PathLike[str], backend: Any) -> None:
    """ConfigError when ``path`` does not end as ``backend``'s artifact does (checked before any work)."""
    backend = ExportBackend.parse(backend)
    want = SUFFIXES[backend]
    got = Path(path).suffix
    if got == want:
        return
    other = next((b for b, s in SUFFIXES.items() if s == got), None)
    hint = f" ({got} is the {other.value} format, backend {other.value!r})" if other is not None else ""
    raise ConfigError(f"{path}: a {backend.value} model is saved as *{want}{hint}; name the output model{want}")


def check_backend_plan(plan: QuantPlan, backend: Any, options: BackendOptions | None = None, *,
                       model: ir.Model | None = None) -> None:
    """Before calibration: every planned spec must convert for ``backend`` with ``options``, and ``model`` (the
    float model, when given) must be one it lowers (BackendError if not)."""
    backend = ExportBackend.parse(backend)
    check_plan(plan, backend)  # the capability table (data) first, then the option-dependent rules
    if backend in _MODULES:
        if model is not None:
            check_float32(model, backend)
            check_torch_ops(model, backend)
        backend_module(backend).legalize_plan(plan, options or BackendOptions())


_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def check_torch_ops(model: ir.Model, backend: Any) -> None:
    """Core ML / Core AI lower through the QAT mirror's torch op table: ops it has no implementation for are named
    before calibration (BackendError), instead of failing the lowering after it."""
    from qdq.errors import ModelError
    from qdq.qat import ops_compute, ops_elementwise, ops_shape  # noqa: F401  (register the built-in ops)
    from qdq.qat.sites import QDQ_DOMAINS
    from qdq.qat.torch_ops import CompileContext, get_op

    name = ExportBackend.parse(backend).value
    ctx = CompileContext.of(model)
    missing: dict[str, str] = {}
    for node in model.graph:
        default = node.domain in QDQ_DOMAINS
        if default and node.op_type in ("Constant", "QuantizeLinear", "DequantizeLinear"):
            continue
        compiler = get_op(node.op_type, node.domain)
        if compiler is None:
            missing.setdefault(node.op_type if default else f"{node.domain}::{node.op_type}", node.name or "")
            continue
        try:
            compiler(node, ctx)  # compile-time refusals (an attribute the mirror does not run) come now
        except ModelError as exc:
            raise BackendError(f"{name} lowering: {first_line(exc)}; quantize this model for onnxruntime") from exc
    if missing:
        listed = ", ".join(f"{op} ('{node_name}')" for op, node_name in list(missing.items())[:5])
        raise BackendError(f"{name} lowering has no torch implementation of {listed}"
                           f"{' and more' if len(missing) > 5 else ''}: quantize this model for onnxruntime, or "
                           "register one with @qdq.qat.register_op")


def check_float32(model: ir.Model, backend: Any) -> None:
    """Core ML / Core AI lower float32 models (their own ``compute_precision`` makes float16 compute): a model with
    float16 / bfloat16 inputs, outputs or weights gets one line saying so (BackendError)."""
    backend = ExportBackend.parse(backend)
    graph = model.graph
    half = [v.name or "" for v in (*graph.inputs, *graph.outputs) if v.dtype in _HALF]
    half += [v.name or "" for v in graph.initializers.values()
             if v.const_value is not None and v.const_value.dtype in _HALF
             and any(u.node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") for u in v.uses())]
    if half:
        hint = (" (the Core ML model computes in float16 with --compute-precision float16)"
                if backend is ExportBackend.CoreML else "")
        raise BackendError(
            f"{backend.value} lowers float32 models, and this one has float16/bfloat16 tensors ({', '.join(half[:3])}"
            f"{', ...' if len(half) > 3 else ''}): export the model in float32{hint}")


@dataclasses.dataclass
class BackendArtifact:
    """A prepared QDQ model finalized for Core ML or Core AI.

    ``exported_program``: the ``torch.export.ExportedProgram`` the converter reads; ``module``: the eager
    module it was traced from (integer weights, the backend's Q/DQ ops); ``notes``: what legalization
    changed; ``onnx_model``: the legalized prepared QDQ model that was lowered. :meth:`convert` returns the
    converter's model (a coremltools ``MLModel`` / a Core AI ``AIProgram``), :meth:`save` writes it.
    """

    backend: ExportBackend
    lowered: LoweredProgram
    onnx_model: ir.Model

    @property
    def exported_program(self) -> Any:
        return self.lowered.program

    @property
    def module(self) -> Any:
        return self.lowered.module

    @property
    def notes(self) -> list[LegalizationNote]:
        return self.lowered.notes

    @property
    def options(self) -> BackendOptions:
        return self.lowered.options

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.lowered.input_names)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.lowered.output_names)

    def convert(self) -> Any:
        """The converted model (coremltools ``MLModel`` for Core ML, ``AIProgram`` for Core AI)."""
        return backend_module(self.backend).convert(self.lowered)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Convert and write ``path`` (``.mlpackage`` / ``.aimodel``) atomically."""
        check_suffix(path, self.backend)
        return Path(backend_module(self.backend).save(self.lowered, path))

    def run(self, *inputs: Any) -> list[np.ndarray]:
        """The lowered program's outputs in eager torch (what the converted model computes, up to float rounding)."""
        import torch

        args = [x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in inputs]
        with torch.no_grad():
            out = self.module(*args)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        return [o.detach().cpu().numpy() for o in outs]

    def __repr__(self) -> str:
        return (f"BackendArtifact({self.backend.value}, inputs={list(self.input_names)}, "
                f"outputs={list(self.output_names)}, notes={len(self.notes)})")


def finalize_for_backend(model: Any, backend: Any, options: BackendOptions | None = None, *,
                         example_inputs: Any = None) -> BackendArtifact:
    """Legalize, fold and lower a prepared QDQ model for Core ML / Core AI (the input is not modified)."""
    from qdq.backends.torch_program import lower
    from qdq.passes.fold_activation_clip import FoldActivationClipPass

    backend = ExportBackend.parse(backend)
    module = backend_module(backend)
    options = options or BackendOptions()
    prepared = load_model(model).clone()
    check_float32(prepared, backend)
    notes = list(module.legalize(prepared, options))
    FoldActivationClipPass(move=False)(prepared)
    lowered = lower(prepared, module.OPS, options, example_inputs=example_inputs)
    lowered.notes = notes
    return BackendArtifact(backend=backend, lowered=lowered, onnx_model=prepared)
