"""OnnxModule: a prepared QDQ ONNX graph run as a trainable ``torch.nn.Module``.

Why the torch mirror is built from the prepared ONNX graph (design (b)) rather than by
annotating the torch model a second time (design (a)):

* **Placement is identical by construction.** The annotate pass decides, once, on the ONNX
  graph which tensors get a QDQ pair (ports, fused activations, shared pass-through qparams,
  consumer-specific pairs); the insert pass writes those pairs into the graph. This module turns
  every Q->DQ pair it finds into one :class:`~qdq.qat.fake_quant.FakeQuantize`, so there is no
  second copy of the placement rules to drift, and no torch/aten -> ONNX op mapping to maintain
  for placement: the only table here maps ONNX op types to torch functions for *execution*
  (:mod:`qdq.qat.torch_ops`).
* **Batch norm folding is identical by construction.** The exporter folds BatchNormalization
  into the preceding Conv; the ONNX side quantizes the folded weight, and so does the mirror,
  because the folded weight *is* the initializer it trains. The price: the folded model trains
  as a frozen-BN model (like torch.ao's ConvBn after ``freeze_bn``): BN statistics no longer
  change, the folded scale/shift are learned as part of the weight and bias. A BatchNormalization
  node the exporter could not fold is run as real batch norm (batch statistics in train mode until
  the schedule's ``freeze_bn`` milestone).
* **Training writes back into the same graph.** Float initializers become ``nn.Parameter``
  (weights, biases, norm affine parameters) or buffers; :meth:`OnnxModule.to_onnx` copies the
  trained values and every fake-quant's scale/zero-point into a clone of the prepared graph, which
  is again a prepared QDQ model that ``finalize_model`` accepts. Nothing is re-exported, so what
  was trained is what is deployed.
* **The numbers agree.** Fake-quant follows the ONNX formulas bit for bit and the calculators are
  the ONNX side's own, fed ``x.detach().cpu().numpy()``; the only differences left are float
  rounding between torch's and onnxruntime's kernels (e.g. Conv accumulation order).

Naming follows the insert pass contract: Q node ``{key}_Q`` with metadata ``qdq.target``,
``qdq.kind``, ``qdq.spec``, ``qdq.shared_with``; shared targets reuse the root's scale Value,
and share one FakeQuantize here. Pairs without metadata (a QDQ model from elsewhere) still work:
the spec is inferred from the zero point's dtype and the sharing from the scale Value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from qdq.dtypes import QDType
from qdq.errors import DataError, ModelError
from qdq.ops import OP_TABLE
from qdq.passes.insert_qdq import zero_point_array
from qdq.qat import ops_compute, ops_elementwise, ops_shape  # noqa: F401  (register the built-in ops)
from qdq.qat.fake_quant import FakeQuantize
from qdq.qat.ort_fallback import ort_fallback
from qdq.qat.sites import (
    QDQ_DOMAINS,
    FakeQuantSite,
    bias_quant_sites,
    infer_spec,
    is_qdq,
    only_qparams,
    pair_of,
    q_layout,
    with_bias_quant,
)
from qdq.qat.torch_ops import CompileContext, OpFn, constant_attr_value, get_op, supported_ops
from qdq.qparams import QParams
from qdq.spec import QuantizationSpec

__all__ = ["FakeQuantSite", "OnnxModule"]

logger = logging.getLogger(__name__)

_NORM_OPS = {"LayerNormalization": (1, 2), "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2)}


@dataclasses.dataclass
class _Step:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    run: OpFn | None = None
    site: FakeQuantSite | None = None


def _sanitize(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "t"
    if base[0].isdigit():
        base = f"t_{base}"
    out, i = base, 1
    while out in taken:
        out = f"{base}_{i}"
        i += 1
    taken.add(out)
    return out


def _name(value: ir.Value | None) -> str:
    return "" if value is None else (value.name or "")


class _Store(nn.Module):
    """Holds the graph's tensors as parameters/buffers under sanitized names."""


class OnnxModule(nn.Module):
    """Runs a prepared QDQ ``onnx_ir.Model`` in torch, with each Q->DQ pair as a FakeQuantize.

    Args:
        model: the prepared QDQ model (not modified; kept as :attr:`onnx_model`).
        fallback_nodes: names of nodes without a torch implementation that may run in
            onnxruntime (forward only; see :class:`~qdq.qat.QATQuantizer`).
        learnable_scale: override the specs' ``learnable_scale``: ``True``/``"all"``,
            ``"weights"``, ``"activations"``, ``False``; ``None`` keeps each spec's choice.
        quantize_bias: also round Conv/Gemm biases to int32 with scale ``s_x * s_w`` where the
            onnxruntime finalize pipeline does (:mod:`qdq.passes.quantize_bias`), so training sees
            the deployed integer model's bias. Off by default: the prepared graph's own semantics
            (float bias), which is what ``Quantizer.run`` and the exported model compute.

    Attributes ``calibrating`` (observe every activation, no gradients) and ``bn_frozen`` are set
    by :class:`~qdq.qat.QATQuantizer`. Activation observers run in train mode (or calibration);
    weight observers whenever enabled, so eval mode equals the exported model.
    """

    def __init__(self, model: ir.Model, *, fallback_nodes: Collection[str] = (),
                 learnable_scale: bool | str | None = None, quantize_bias: bool = False) -> None:
        super().__init__()
        self.onnx_model = model
        self.quantize_bias = quantize_bias
        self.calibrating = False
        self.bn_frozen = False
        graph = model.graph
        self.input_names = [v.name or "" for v in graph.inputs]
        self.output_names = [v.name or "" for v in graph.outputs]
        ctx = CompileContext.of(model)

        pairs: dict[int, ir.Node] = {}
        for node in graph:
            if is_qdq(node, "QuantizeLinear"):
                pairs[id(node)] = pair_of(node)
        paired_dq = {id(dq) for dq in pairs.values()}
        for node in graph:
            if is_qdq(node, "DequantizeLinear") and id(node) not in paired_dq:
                raise ModelError(
                    f"DequantizeLinear '{node.name}' has no QuantizeLinear before it (an already finalized model?); "
                    "the QAT mirror needs the prepared QDQ form with float weights"
                )

        self.store = _Store()
        self._tensor_attr: dict[str, str] = {}  # ONNX value name -> attribute of self.store
        self._initializer_names: list[str] = []
        self._init_dtypes: dict[str, np.dtype] = {}
        taken: set[str] = set()
        trainable = _trainable_initializers(graph, pairs)
        for name, value in graph.initializers.items():
            if value.const_value is None or only_qparams(value):
                continue
            arr = value.const_value.numpy()
            tensor = _to_torch(arr, f"initializer '{name}'")
            attr = _sanitize(name, taken)
            if name in trainable and tensor.is_floating_point():
                self.store.register_parameter(attr, nn.Parameter(tensor))
            else:
                self.store.register_buffer(attr, tensor)
            self._tensor_attr[name] = attr
            self._initializer_names.append(name)
            self._init_dtypes[name] = arr.dtype

        self.fake_quants = nn.ModuleDict()
        self._fq_attr: dict[str, str] = {}
        self.sites: dict[str, FakeQuantSite] = {}
        root_by_scale: dict[int, str] = {}
        fq_taken: set[str] = set()
        steps: list[_Step] = []
        fallback = set(fallback_nodes)
        for node in graph:
            if node.op_type == "Constant" and node.domain in QDQ_DOMAINS:
                attr = _sanitize(node.outputs[0].name or node.name or "const", taken)
                self.store.register_buffer(attr, _to_torch(constant_attr_value(node), f"Constant '{node.name}'"))
                self._tensor_attr[node.outputs[0].name or ""] = attr
                continue
            if id(node) in paired_dq:
                continue
            if id(node) in pairs:
                site = self._add_site(node, pairs[id(node)], root_by_scale, learnable_scale, fq_taken)
                steps.append(_Step(node.name or site.key, "QuantizeLinear", (_name(node.inputs[0]),),
                                   (site.output,), site=site))
                continue
            run = self._compile(node, ctx, fallback, model)
            bias_sites = bias_quant_sites(node, self.sites) if quantize_bias else None
            if bias_sites is not None:
                run = with_bias_quant(run, *bias_sites)
            steps.append(_Step(node.name or "", node.op_type, tuple((v.name or "") if v is not None else ""
                                                                      for v in node.inputs),
                               tuple(v.name or "" for v in node.outputs), run=run))
        self._steps = steps
        self._free = _last_uses(steps, set(self.output_names))
        logger.info("QAT mirror: %d ops, %d fake-quant sites (%d with own qparams), %d trainable tensors",
                    len(steps) - len(self.sites), len(self.sites), len(self.fake_quants),
                    sum(1 for _ in self.store.parameters()))

    # ------------------------------------------------------------------ construction helpers
    def _compile(self, node: ir.Node, ctx: CompileContext, fallback: set[str], model: ir.Model) -> OpFn:
        compiler = get_op(node.op_type, node.domain)
        if compiler is not None:
            return compiler(node, ctx)
        if node.name in fallback:
            logger.warning("node '%s' (%s) has no torch implementation; it runs in onnxruntime without gradients",
                           node.name, node.op_type)
            return ort_fallback(node, model)
        domain = f"{node.domain}::" if node.domain not in QDQ_DOMAINS else ""
        raise ModelError(
            f"the QAT mirror cannot run node '{node.name}' ({domain}{node.op_type}): no torch implementation. "
            f"Leave it float with op_name_configs={{'{node.name}': None}} (the mirror then runs it in onnxruntime, "
            f"forward only, no gradients through it), or register one with "
            f"@qdq.qat.register_op('{node.op_type}'). Supported: {', '.join(supported_ops())}"
        )

    def _add_site(self, q: ir.Node, dq: ir.Node, root_by_scale: dict[int, str],
                  learnable: bool | str | None, taken: set[str]) -> FakeQuantSite:
        meta = q.metadata_props
        x, scale_v = q.inputs[0], q.inputs[1]
        zp_v = q.inputs[2] if len(q.inputs) > 2 else None
        if x is None or scale_v is None or scale_v.const_value is None:
            raise ModelError(f"QuantizeLinear '{q.name}' needs a constant scale for the QAT mirror")
        qname = q.name or ""
        key = meta.get("qdq.target") or (qname[:-2] if qname.endswith("_Q") else (qname or x.name or ""))
        if key in self.sites:
            raise ModelError(f"two Q->DQ pairs claim target '{key}' (nodes '{self.sites[key].q_node}', '{q.name}')")
        root = meta.get("qdq.shared_with") or root_by_scale.get(id(scale_v), key)
        root_by_scale.setdefault(id(scale_v), root)
        kind = meta.get("qdq.kind") or ("weight" if x.is_initializer() or x.const_value is not None else "activation")
        site = FakeQuantSite(key=key, root=root, tensor=meta.get("qdq.tensor") or (x.name or ""), kind=kind,
                             q_node=q.name or "", dq_node=dq.name or "", codes=q.outputs[0].name or "",
                             output=dq.outputs[0].name or "")
        self.sites[key] = site
        if root not in self._fq_attr:
            scale = np.asarray(scale_v.const_value.numpy(), np.float32)
            zp_dtype = zp_v.dtype if zp_v is not None else ir.DataType.UINT8
            try:
                dtype = QDType.from_ir(zp_dtype)  # type: ignore[arg-type]
            except KeyError:
                raise ModelError(f"QuantizeLinear '{q.name}': zero point type {zp_dtype} is not a qdq dtype") from None
            zp_raw = zp_v.const_value.numpy() if zp_v is not None and zp_v.const_value is not None \
                else np.zeros(scale.shape, dtype.np_dtype)
            zp = np.zeros(scale.shape, np.float32) if dtype.is_float else np.asarray(zp_raw).astype(np.int32)
            rank = len(x.shape) if x.shape is not None else (
                len(x.const_value.shape) if x.const_value is not None else None)
            layout = q_layout(q, scale, rank)
            spec = (QuantizationSpec.from_dict(json.loads(meta["qdq.spec"])) if "qdq.spec" in meta
                    else infer_spec(zp, dtype, scale, layout.axis, layout.block_size))
            if learnable is not None:
                want = learnable in (True, "all") or learnable == ("weights" if kind == "weight" else "activations")
                if kind == "constant":
                    want = False
                spec = spec.replace(learnable_scale=bool(want))
            fq = FakeQuantize(spec, layout, is_weight=kind == "weight", qparams=QParams(scale, zp), name=root)
            attr = _sanitize(root, taken)
            self.fake_quants[attr] = fq
            self._fq_attr[root] = attr
        return site

    # ------------------------------------------------------------------ access
    def fake_quant(self, key: str) -> FakeQuantize:
        """The FakeQuantize whose qparams target ``key`` uses (its root's)."""
        site = self.sites.get(key)
        root = site.root if site is not None else key
        if root not in self._fq_attr:
            raise KeyError(f"no fake-quant target '{key}'")
        return self.fake_quants[self._fq_attr[root]]  # type: ignore[return-value]

    def roots(self) -> Iterator[tuple[str, FakeQuantize]]:
        """(root key, FakeQuantize) for every module with its own qparams."""
        for root, attr in self._fq_attr.items():
            yield root, self.fake_quants[attr]  # type: ignore[misc]

    def root_site(self, root: str) -> FakeQuantSite:
        return self.sites[root] if root in self.sites else next(s for s in self.sites.values() if s.root == root)

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter/buffer holding ONNX initializer (or Constant output) ``name``."""
        if name not in self._tensor_attr:
            raise KeyError(f"no initializer '{name}' in the mirror")
        return getattr(self.store, self._tensor_attr[name])

    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable tensors keyed by their ONNX initializer name."""
        return {n: t for n in self._initializer_names if isinstance(t := self.tensor(n), nn.Parameter)}

    def qparams(self) -> dict[str, QParams]:
        """Current scale/zero point of every target (shared targets report their root's)."""
        return {key: self.fake_quant(key).qparams() for key in self.sites}

    # ------------------------------------------------------------------ running
    def _bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if len(args) == 1 and isinstance(args[0], (tuple, list)) and len(self.input_names) > 1:
            args = tuple(args[0])
        if len(args) > len(self.input_names):
            raise DataError(f"model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(args)}")
        env: dict[str, Any] = {name: getattr(self.store, attr) for name, attr in self._tensor_attr.items()}
        given = dict(zip(self.input_names, args))
        given.update(kwargs)
        for name in self.input_names:
            if name not in given:
                raise DataError(f"missing model input '{name}' (inputs: {', '.join(self.input_names)})")
            x = given[name]
            env[name] = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        return env

    def _observes(self, site: FakeQuantSite, fq: FakeQuantize) -> bool:
        if site.kind == "activation":
            return self.training or self.calibrating
        if site.kind == "constant":
            return not fq.calculator.has_data
        return True

    def _run_site(self, site: FakeQuantSite, x: torch.Tensor | None, capture: dict[str, Any] | None,
                  forced: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One Q->DQ pair as fake-quant (subclasses, e.g. the backend lowering, run other modules here)."""
        assert x is not None
        fq = self.fake_quant(site.root)
        if not site.shared and fq.observer_enabled and self._observes(site, fq):
            fq.observe(x)
        if capture is not None and fq.initialized:
            capture[site.codes] = fq.codes(x)
        if forced is not None and site.output in forced:
            return forced[site.output]
        if not fq.fake_quant_enabled:
            return x
        y = fq.fake_quant(x)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _run(self, env: dict[str, Any], capture: dict[str, Any] | None,
             forced: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        for i, step in enumerate(self._steps):
            ins = [env[n] if n else None for n in step.inputs]
            if step.site is not None:
                outs: Any = (self._run_site(step.site, ins[0], capture, forced),)
            else:
                try:
                    outs = step.run(ins, self)  # type: ignore[misc]
                except (ModelError, DataError):
                    raise
                except Exception as exc:
                    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in ins]
                    raise ModelError(f"QAT mirror: node '{step.name}' ({step.op_type}) failed on inputs {shapes}: "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
            for name, out in zip(step.outputs, outs):
                if name:
                    env[name] = out
            if capture is None:
                for name in self._free[i]:
                    env.pop(name, None)
        missing = [n for n in self.output_names if n not in env]
        if missing:
            raise ModelError(f"graph outputs {missing} are not computed by any node")
        return [env[n] for n in self.output_names]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph; one tensor for single-output graphs, else a tuple (graph output order)."""
        env = self._bind(args, kwargs)
        if self.calibrating:
            with torch.no_grad():
                outs = self._run(env, None)
        else:
            outs = self._run(env, None)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @torch.no_grad()
    def capture(self, *args: Any, forced: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Every named value of one run, by ONNX name: ``{key}_quantized`` holds the codes
        (as float32 values) and ``{key}_dequantized`` the fake-quantized tensor, as in the graph.

        ``forced`` (DQ output name -> tensor) replaces those fake-quant outputs (teacher forcing:
        each quantized tensor is then computed from the given upstream values, e.g. onnxruntime's).
        """
        env = self._bind(args, kwargs)
        inputs = set(env)
        codes: dict[str, Any] = {}
        force = None if forced is None else {k: torch.as_tensor(np.asarray(v)) for k, v in forced.items()}
        self._run(env, codes, force)
        env.update(codes)
        return {k: v for k, v in env.items() if k not in inputs or k in self.input_names}

    # ------------------------------------------------------------------ write back
    @torch.no_grad()
    def sync_weight_qparams(self) -> None:
        """Re-observe every weight whose observer is on, so its qparams match the current weight
        (an optimizer step after the last forward leaves them one step behind)."""
        for root, fq in self.roots():
            site = self.root_site(root)
            if site.kind == "weight" and fq.observer_enabled:
                fq.observe(self.tensor(site.tensor) if site.tensor in self._tensor_attr else self._weight_of(site))

    def _weight_of(self, site: FakeQuantSite) -> torch.Tensor:
        step = next(s for s in self._steps if s.site is site)
        return self.tensor(step.inputs[0])

    def to_onnx(self) -> ir.Model:
        """A new prepared QDQ model: the graph with the current weights and qparams written back
        (weight qparams re-observed first where their observer is on)."""
        self.sync_weight_qparams()
        model = self.onnx_model.clone()
        graph = model.graph
        for name in self._initializer_names:
            t = self.tensor(name)
            if not t.is_floating_point():
                continue
            value = graph.initializers[name]
            arr = t.detach().cpu().numpy().astype(self._init_dtypes[name], copy=False)
            # np.ascontiguousarray would turn a scalar into shape (1,): keep the initializer's shape
            value.const_value = ir.tensor(np.array(arr, order="C", copy=True).reshape(tuple(t.shape)), name=name)
        nodes = {n.name: n for n in graph if n.name}
        for root, fq in self.roots():
            q = nodes[self.root_site(root).q_node]
            qp = fq.qparams()
            scale_v, zp_v = q.inputs[1], (q.inputs[2] if len(q.inputs) > 2 else None)
            assert scale_v is not None and scale_v.const_value is not None
            shape = tuple(scale_v.const_value.shape.numpy())
            scale = np.asarray(qp.scale, np.float32)
            if scale.size != int(np.prod(shape)):
                raise ModelError(f"fake-quant '{root}': scale has {scale.size} values, the graph expects shape {shape}")
            scale_v.const_value = ir.tensor(scale.reshape(shape), name=scale_v.name)
            if zp_v is not None:
                zp = zero_point_array(qp, fq.dtype).reshape(shape)
                zp_v.const_value = ir.tensor(zp, name=zp_v.name)
        return model

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, outputs={self.output_names}, ops={len(self._steps)}"


# --------------------------------------------------------------------------- helpers
def _to_torch(arr: np.ndarray, what: str) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub" or arr.dtype.itemsize == 0 or arr.dtype.name.startswith(("float8", "int4", "uint4")):
        raise ModelError(f"{what} has dtype {arr.dtype}, which the QAT mirror cannot hold as a torch tensor")
    return torch.from_numpy(np.array(arr, copy=True))


def _weight_source(value: ir.Value | None) -> ir.Value | None:
    """The float initializer behind ``value`` (itself, or the input of the Q->DQ pair producing it)."""
    if value is None:
        return None
    if value.is_initializer():
        return value
    dq = value.producer()
    if dq is not None and is_qdq(dq, "DequantizeLinear"):
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is not None and is_qdq(q, "QuantizeLinear") and q.inputs[0] is not None and q.inputs[0].is_initializer():
            return q.inputs[0]
    return None


def _trainable_initializers(graph: ir.Graph, pairs: Mapping[int, ir.Node]) -> set[str]:
    """Names of initializers that train: weights and biases of compute ops (qdq/ops.py state ports),
    the bias of a MatMul->Add, norm scales/shifts, and every input of a ``weight`` Q node."""
    names: set[str] = set()

    def add(v: ir.Value | None) -> None:
        src = _weight_source(v)
        if src is not None and src.name:
            names.add(src.name)

    for node in graph:
        if is_qdq(node, "QuantizeLinear") and node.metadata_props.get("qdq.kind") == "weight":
            add(node.inputs[0])
            continue
        info = OP_TABLE.get(node.op_type)
        if info is not None:
            for port in ("weight", "bias"):
                i = info.state.get(port)
                if i is not None and i < len(node.inputs):
                    add(node.inputs[i])
        if node.op_type in _NORM_OPS:
            for i in _NORM_OPS[node.op_type]:
                if i < len(node.inputs):
                    add(node.inputs[i])
        if node.op_type == "Add":
            for i, v in enumerate(node.inputs[:2]):
                prod = v.producer() if v is not None else None
                other = node.inputs[1 - i]
                if (prod is not None and prod.op_type == "MatMul" and _weight_source(prod.inputs[1]) is not None
                        and other is not None and other.is_initializer()):
                    add(other)
    return names


def _last_uses(steps: list[_Step], keep: set[str]) -> list[list[str]]:
    """For each step, the values no later step reads (freed after it to bound memory)."""
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for name in step.inputs:
            if name:
                last[name] = i
    free: list[list[str]] = [[] for _ in steps]
    for name, i in last.items():
        if name not in keep:
            free[i].append(name)
    return free


