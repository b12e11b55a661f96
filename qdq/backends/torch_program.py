"""Lower a prepared QDQ model to a ``torch.export`` program for a torch-program backend (Core ML, Core AI).

The graph runs on the QAT mirror's op table (:class:`~qdq.qat.onnx_module.OnnxModule`), but every
Q->DQ pair becomes a module of the backend's :class:`~qdq.backends.lowering.BackendOps` instead of a
fake-quant: a weight (or constant) site holds only the integer codes, computed once with qdq's exact
ONNX numerics (:func:`qdq.numerics.quantize`), and its float initializer is dropped when nothing else
reads it; an activation site quantizes and dequantizes at run time with the backend's ops. The module
is traced by ``torch.export`` (dynamic batch where the ONNX model has a symbolic batch dimension) and
decomposed with the backend's table, which is what the backend's converter reads.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from qdq import numerics
from qdq.backends.lowering import BackendOps, BackendOptions, LoweredProgram, SiteInfo
from qdq.errors import BackendError, DataError, ModelError, QdqError, first_line
from qdq.model_io import load_model
from qdq.qat.fake_quant import FakeQuantize, quantize_codes
from qdq.qat.onnx_module import OnnxModule, _last_uses, _sanitize
from qdq.qat.sites import FakeQuantSite
from qdq.qat.torch_ops import TORCH_DTYPES

__all__ = ["BackendModule", "example_inputs_for", "lower", "site_infos"]

logger = logging.getLogger(__name__)

_EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1, so trace a dynamic batch with 2


class BackendModule(OnnxModule):
    """The prepared graph with every Q->DQ pair run by a backend module (integer weights, no fake-quant).

    ``site_modules`` holds one module per weight site (its codes) and one per activation root (shared
    qparams share a module). :meth:`capture` still reports every site's codes (recovered exactly from
    the dequantized values), so :func:`qdq.qat.parity.code_parity` compares it with onnxruntime.
    """

    def __init__(self, model: ir.Model, ops: BackendOps) -> None:
        super().__init__(model)
        self.requires_grad_(False)
        self.eval()
        self.backend = ops.name
        # qparams stay available to capture/code_parity, but are not part of the exported module
        self._qparams: dict[str, FakeQuantize] = dict(self.roots())
        del self.fake_quants
        self.site_modules = nn.ModuleDict()
        self._site_attr: dict[str, str] = {}
        self._weight_keys: set[str] = set()
        self.infos: dict[str, SiteInfo] = {}
        taken: set[str] = set()
        frozen_sources: set[str] = set()
        steps = []
        for step in self._steps:
            site = step.site
            if site is None:
                steps.append(step)
                continue
            source = step.inputs[0]
            fq = self._qparams[site.root]
            if site.kind in ("weight", "constant") and source in self._tensor_attr:
                w = self.tensor(source).detach().cpu().numpy()
                info = _site_info(site, fq, tuple(w.shape))
                codes = weight_codes(w, info)
                attr = _sanitize(site.key, taken)
                self.site_modules[attr] = _checked(ops.weight_module(info, codes), ops, site.key)
                self._site_attr[site.key] = attr
                self._weight_keys.add(site.key)
                frozen_sources.add(source)
                step = dataclasses.replace(step, inputs=("",))
            else:
                if site.kind != "activation":
                    logger.info("site '%s' (%s) is computed at run time: quantized as an activation",
                                site.key, site.kind)
                info = _site_info(site, fq, None, kind="activation")
                if site.root not in self._site_attr:
                    attr = _sanitize(site.root, taken)
                    self.site_modules[attr] = _checked(ops.activation_module(info), ops, site.key)
                    self._site_attr[site.root] = attr
                self._site_attr[site.key] = self._site_attr[site.root]
            self.infos[site.key] = info
            steps.append(step)
        still_read = {name for s in steps for name in s.inputs} | set(self.output_names)
        for name in frozen_sources - still_read:
            delattr(self.store, self._tensor_attr.pop(name))
            self._initializer_names.remove(name)
        self._steps = steps
        self._free = _last_uses(steps, set(self.output_names))
        # integer constants (axes, shapes, indices) stay plain tensors, not buffers: torch.export then keeps
        # them real, so ops that read their values (``tolist()``) trace without data-dependent guards
        self._static: dict[str, torch.Tensor] = {}
        for name, attr in list(self._tensor_attr.items()):
            t = getattr(self.store, attr)
            if not t.is_floating_point():
                t = t.clone()
                t.qdq_static_value = [int(v) for v in t.reshape(-1).tolist()]  # type: ignore[attr-defined]
                self._static[name] = t
                delattr(self.store, attr)
                del self._tensor_attr[name]
        logger.info("%s lowering: %d weight sites with integer codes, %d activation modules, %d float weights dropped",
                    ops.name, len(self._weight_keys), len(self.site_modules) - len(self._weight_keys),
                    len(frozen_sources - still_read))

    def _bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        env = super()._bind(args, kwargs)
        env.update(self._static)
        return env

    # qparams access for capture / code_parity (the FakeQuantize objects hold scale and zero point only)
    def fake_quant(self, key: str) -> FakeQuantize:
        site = self.sites.get(key)
        root = site.root if site is not None else key
        if root not in self._qparams:
            raise KeyError(f"no quantized target '{key}'")
        return self._qparams[root]

    def roots(self) -> Any:
        if "_qparams" not in self.__dict__:  # during OnnxModule construction
            return super().roots()
        return iter(self._qparams.items())

    def _run_site(self, site: FakeQuantSite, x: torch.Tensor | None, capture: dict[str, Any] | None,
                  forced: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        module = self.site_modules[self._site_attr[site.key]]
        if site.key in self._weight_keys:
            y = module()
        else:
            assert x is not None
            y = module(x)
        if capture is not None:
            fq = self._qparams[site.root]
            capture[site.codes] = quantize_codes(y.detach(), fq.scale, fq.zero_point, fq.dtype, fq.layout)
        if forced is not None and site.output in forced:
            return forced[site.output]
        return y

    def sync_weight_qparams(self) -> None:
        raise ModelError("a lowered backend module has frozen integer weights; write back from the QAT mirror")

    def to_onnx(self) -> ir.Model:
        raise ModelError("a lowered backend module has frozen integer weights; export from the QAT mirror")


class _Program(nn.Module):
    """Positional entry point for ``torch.export`` (graph input order, one tensor or a tuple out)."""

    def __init__(self, inner: BackendModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> Any:
        return self.inner(*args)


def weight_codes(w: np.ndarray, info: SiteInfo) -> np.ndarray:
    """ONNX QuantizeLinear's output values for a weight: int32 for integer dtypes, float32 for float8."""
    zp = None if info.dtype.is_float else info.zero_point
    q = numerics.quantize(np.asarray(w, np.float32), info.scale, zp, info.dtype, info.layout)
    return np.asarray(q).astype(np.float32 if info.dtype.is_float else np.int32)


def _site_info(site: FakeQuantSite, fq: FakeQuantize, shape: tuple[int, ...] | None, kind: str | None = None) -> SiteInfo:
    qp = fq.qparams()
    zp = np.zeros(np.shape(qp.scale), np.float32) if fq.dtype.is_float else np.asarray(qp.zero_point, np.int32)
    return SiteInfo(key=site.key, tensor=site.tensor, kind=kind or site.kind, dtype=fq.dtype, layout=fq.layout,
                    scale=np.asarray(qp.scale, np.float32), zero_point=zp.reshape(np.shape(qp.scale)), shape=shape)


def _checked(module: Any, ops: BackendOps, key: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{type(ops).__name__} returned {type(module).__name__} for site '{key}', not an nn.Module")
    return module


def site_infos(model: Any) -> dict[str, SiteInfo]:
    """Every Q->DQ site of a prepared model as :class:`SiteInfo` (for legalization before lowering)."""
    mirror = OnnxModule(load_model(model))
    out: dict[str, SiteInfo] = {}
    for key, site in mirror.sites.items():
        shape = tuple(mirror.tensor(site.tensor).shape) if site.tensor in mirror._tensor_attr else None
        out[key] = _site_info(site, mirror.fake_quant(key), shape)
    return out


def example_inputs_for(model: ir.Model) -> tuple[torch.Tensor, ...]:
    """Example inputs from the graph inputs' shapes and dtypes (a symbolic batch dimension traces as 2)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for v in model.graph.inputs:
        if v.shape is None or v.dtype is None:
            raise ModelError(f"graph input '{v.name}' has no static shape/dtype; pass example_inputs to lower()")
        dims = []
        for i, d in enumerate(v.shape):
            if isinstance(d, int):
                dims.append(d)
            elif i == 0:
                dims.append(_EXAMPLE_BATCH)
            else:
                raise ModelError(f"graph input '{v.name}' has symbolic dimension {i} ('{d}'); pass example_inputs "
                                 "with the size to trace")
        dtype = TORCH_DTYPES.get(v.dtype)
        if dtype is None:
            raise ModelError(f"graph input '{v.name}' has dtype {v.dtype}, which torch cannot hold")
        if dtype.is_floating_point:
            out.append(torch.randn(dims, generator=gen).to(dtype))
        else:
            out.append(torch.zeros(dims, dtype=dtype))
    return tuple(out)


def _batch_dynamic_shapes(model: ir.Model, inputs: Sequence[torch.Tensor]) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` with one shared batch Dim for every input whose ONNX dim 0 is symbolic."""
    batch = torch.export.Dim("batch", min=1)
    spec: list[Any] = []
    for v, x in zip(model.graph.inputs, inputs):
        symbolic = v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int)
        spec.append({0: batch} if symbolic and x.dim() > 0 and x.shape[0] > 1 else None)
    return tuple(spec) if any(s is not None for s in spec) else None


def fold_static_shapes(model: ir.Model, inputs: Sequence[torch.Tensor]) -> ir.Model:
    """A copy of ``model`` with its inputs fixed to ``inputs``' shapes and the shape arithmetic folded to constants.

    Transformers compute Expand / Reshape targets from ``Shape`` of their inputs (position ids, attention-mask
    broadcasts); traced by ``torch.export`` those are tensor values it cannot specialise. With static input
    shapes onnxscript's constant folding turns them into constants. QuantizeLinear / DequantizeLinear are never
    folded (the weights stay quantized sites).
    """
    from onnxscript.optimizer import fold_constants

    static = model.clone()
    for value, x in zip(static.graph.inputs, inputs, strict=True):
        value.shape = ir.Shape(list(x.shape))
    keep = {"QuantizeLinear", "DequantizeLinear"}
    fold_constants(static, onnx_shape_inference=True, should_fold=lambda n: False if n.op_type in keep else None)
    return static


def _export(program: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic: tuple[Any, ...] | None,
            backend: str, static_program: Callable[[], nn.Module] | None = None) -> tuple[Any, nn.Module]:
    """``torch.export.export`` with a dynamic batch, falling back to static shapes (logged) if that fails, and
    then to ``static_program()`` (shape arithmetic folded). Returns the program and the module exported."""
    if dynamic is not None:
        try:
            return torch.export.export(program, inputs, dynamic_shapes={"args": dynamic}), program
        except Exception as exc:  # noqa: BLE001  (any tracer failure: retry static)
            logger.warning("export with a dynamic batch dimension failed (%s); exporting with static shapes %s",
                           first_line(exc, with_type=True), [tuple(x.shape) for x in inputs])
    try:
        return torch.export.export(program, inputs), program
    except QdqError as exc:
        if static_program is None:
            raise
        first = exc
    except Exception as exc:
        if static_program is None:
            raise BackendError(f"torch.export could not trace the {backend} program: "
                               f"{first_line(exc, with_type=True)}") from exc
        first = exc  # type: ignore[assignment]
    logger.info("static export failed (%s); retrying with the shape arithmetic folded to constants",
                first_line(first, with_type=True))
    folded = static_program()
    try:
        return torch.export.export(folded, inputs), folded
    except QdqError:
        raise
    except Exception as exc:
        raise BackendError(f"torch.export could not trace the {backend} program: "
                           f"{first_line(exc, with_type=True)}") from exc


def lower(model: Any, ops: BackendOps, options: BackendOptions | None = None, *,
          example_inputs: Sequence[Any] | None = None) -> LoweredProgram:
    """Lower a prepared QDQ model to ``ops``' torch program (see the module docstring).

    ``model``: what ``Quantizer.qdq_model()`` returns (or a path to it). ``example_inputs``: tensors to
    trace with (default: from the graph inputs' shapes; a symbolic batch dimension traces as 2).
    """
    options = options or BackendOptions()
    model = load_model(model)
    module = BackendModule(model, ops)
    if example_inputs is None:
        inputs = example_inputs_for(model)
    else:
        inputs = tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in example_inputs)
        if len(inputs) != len(module.input_names):
            raise DataError(f"the model takes {len(module.input_names)} inputs ({', '.join(module.input_names)}), "
                            f"got {len(inputs)} example inputs")
    program = _Program(module).eval()
    dynamic = _batch_dynamic_shapes(model, inputs) if options.dynamic_batch else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own pytree deprecations
        ep, exported = _export(program, inputs, dynamic, ops.name,
                               static_program=lambda: _Program(BackendModule(fold_static_shapes(model, inputs),
                                                                             ops)).eval())
        module = exported.inner if isinstance(exported, _Program) else module
        try:
            ep = ep.run_decompositions(ops.decompositions())
        except QdqError:
            raise
        except Exception as exc:
            raise BackendError(f"decomposing the {ops.name} program failed: {first_line(exc, with_type=True)}") \
                from exc
    return LoweredProgram(
        backend=ops.name, program=ep, module=module,
        input_names=tuple(options.input_names or module.input_names),
        output_names=tuple(options.output_names or module.output_names),
        example_inputs=inputs, options=options,
    )
