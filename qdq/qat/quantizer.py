"""QATQuantizer: the same QuantizerConfig as the ONNX side, as trainable fake-quant in PyTorch.

::

    qat = QATQuantizer(torch_model, config)          # config: QuantizerConfig / mapping / YAML path
    qmodel = qat.prepare(example_inputs)              # nn.Module: fake-quant exactly where ONNX has QDQ
    with qat.calibration_mode():                      # observers on, fake-quant off
        for batch in calibration_batches:
            qmodel(batch)
    qat.load_qparams(onnx_quantizer)                  # optional: start from ONNX-side PTQ qparams
    for x, y in loader:
        loss_fn(qmodel(x), y).backward(); opt.step(); opt.zero_grad(); qat.step()
    qat.export("model.qdq.onnx", example_inputs)      # prepared QDQ ONNX; or backend=... to finalize

``prepare`` exports the model with :func:`qdq.torch_export.export` (BatchNorm folded), plans and
inserts QDQ with :class:`qdq.quantizer.Quantizer`, and turns that prepared graph into an
:class:`~qdq.qat.onnx_module.OnnxModule` (see its module docstring for why the mirror is built
from the ONNX graph). The module's forward is differentiable: straight-through estimator for
values, optional LSQ scales; ``qat.step()`` advances the :class:`~qdq.qat.schedule.QATSchedule`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from qdq.calibration.base import RangeCalculatorBase
from qdq.config import QuantizerConfig
from qdq.errors import ConfigError, DataError, ModelError
from qdq.model_io import load_model, save
from qdq.plan import QuantPlan, QuantTarget
from qdq.qat.fake_quant import FakeQuantize
from qdq.qat.onnx_module import OnnxModule
from qdq.qat.schedule import QATSchedule
from qdq.qat.torch_ops import get_op
from qdq.qparams import QParams, quant_range
from qdq.quantizer import Quantizer, as_config, finalize_model
from qdq.spec import QScheme

__all__ = ["QATQuantizer", "read_qparams"]

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float32).eps)


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _as_tensor(x: Any) -> Any:
    return torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x


def read_qparams(source: Any) -> dict[str, QParams]:
    """Target key -> qparams from a :class:`Quantizer`, its PreparedModel, a mapping, or a prepared QDQ model."""
    if isinstance(source, Quantizer):
        return dict(source.qparams)
    if hasattr(source, "quantizer") and isinstance(source.quantizer, Quantizer):
        return dict(source.quantizer.qparams)
    if isinstance(source, Mapping):
        return {str(k): v if isinstance(v, QParams) else QParams(*v) for k, v in source.items()}
    model = load_model(source)
    out: dict[str, QParams] = {}
    for node in model.graph:
        key = node.metadata_props.get("qdq.target")
        if node.op_type != "QuantizeLinear" or key is None:
            continue
        scale_v = node.inputs[1]
        zp_v = node.inputs[2] if len(node.inputs) > 2 else None
        if scale_v is None or scale_v.const_value is None:
            continue
        scale = np.asarray(scale_v.const_value.numpy(), np.float32)
        zp = zp_v.const_value.numpy() if zp_v is not None and zp_v.const_value is not None else np.zeros(scale.shape)
        zp_arr = np.asarray(zp).astype(np.float32)
        if zp_v is None or not str(np.asarray(zp).dtype).startswith("float8"):
            zp_arr = zp_arr.astype(np.int32)
        out[key] = QParams(scale, zp_arr)
    if not out:
        raise ModelError("no qdq QuantizeLinear nodes (metadata 'qdq.target') found to read qparams from")
    return out


def _seed_range(fq: FakeQuantize, qp: QParams) -> None:
    """Give a min/max calculator the range that reproduces ``qp``, so observation continues from it."""
    calc = fq.calculator
    if not isinstance(calc, RangeCalculatorBase):
        fq.reset_observer()
        return
    spec = fq.spec
    scale = np.asarray(qp.scale, np.float32)
    qmin, qmax = quant_range(spec.dtype, spec.qscheme)
    if spec.dtype.is_float:
        hi = scale * np.float32(qmax)
        lo = -hi
    elif spec.qscheme is QScheme.ASYMMETRIC:
        zp = np.asarray(qp.zero_point, np.float32)
        lo, hi = (np.float32(qmin) - zp) * scale, (np.float32(qmax) - zp) * scale
    else:
        denom = qmax if (spec.qscheme is QScheme.SYMMETRIC_WITH_CLIPPING and spec.dtype.is_signed) else (qmax - qmin) / 2
        hi = scale * np.float32(denom)
        lo = -hi
    calc.min_val, calc.max_val = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    calc.num_batches = max(calc.num_batches, 1)


class QATQuantizer:
    """Quantization-aware training driven by a :class:`~qdq.config.QuantizerConfig`.

    Args:
        model: a ``torch.nn.Module`` (exported at :meth:`prepare`) or a float ONNX model
            (path / ``onnx.ModelProto`` / ``onnx_ir.Model``).
        config: the ONNX side's config (object, mapping, YAML path or preset name).
        schedule: overrides ``config.qat_schedule`` (a :class:`QATSchedule` or mapping).
        opset: ONNX opset for the export (default: the exporter's).
        quantize_bias: train with the int32 Conv/Gemm bias the onnxruntime finalize writes
            (see :class:`~qdq.qat.onnx_module.OnnxModule`); default: the prepared graph's float bias.
    """

    def __init__(self, model: Any, config: Any = None, *, schedule: Any = None, opset: int | None = None,
                 quantize_bias: bool = False) -> None:
        self.config: QuantizerConfig = as_config(config)
        self.schedule = QATSchedule.from_dict(schedule if schedule is not None else self.config.qat_schedule)
        self._source = model
        self._opset = opset
        self.quantize_bias = quantize_bias
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._quantizer: Quantizer | None = None  # plans and inserts QDQ (never calibrated)
        self.model: OnnxModule | None = None
        self.step_count = 0
        self._reset_on_calibration = False
        self._frozen: set[str] = set()

    # ------------------------------------------------------------------ prepare
    def _float_onnx(self, args: tuple[Any, ...]) -> Any:
        if not isinstance(self._source, torch.nn.Module):
            return self._source
        from qdq.torch_export import export

        self._tmp = tempfile.TemporaryDirectory(prefix="qdq-qat-")
        path = Path(self._tmp.name) / "float.onnx"
        export(self._source, tuple(_as_tensor(a) for a in args), path, opset=self._opset)
        return path

    def prepare(self, example_inputs: Any) -> OnnxModule:
        """Export, plan and insert QDQ (as the ONNX side does), and return the trainable mirror.

        ``example_inputs`` (a tensor/array or a tuple of them) drive the export and seed every
        range, so the mirror runs at once; the first calibration batch discards the seed.
        """
        args = _as_args(example_inputs)
        quantizer = Quantizer(self._float_onnx(args), self.config)
        quantizer.prepare(args[0] if len(args) == 1 else args)
        qdq = quantizer.qdq_model()
        from qdq.passes.annotate import unquantized_nodes

        floating = unquantized_nodes(quantizer.float_model, self.config)
        fallback = {n.name for n in quantizer.float_model.graph
                    if n.name in floating and get_op(n.op_type, n.domain) is None}
        self._quantizer = quantizer
        self.model = OnnxModule(qdq, fallback_nodes=fallback, learnable_scale=self.schedule.learnable_scale,
                                quantize_bias=self.quantize_bias)
        self.step_count = 0
        self._frozen.clear()
        self._observe_all(lambda: self.model(*args))  # type: ignore[misc]
        self._reset_on_calibration = True
        self._apply_schedule()
        return self.model

    def _require(self) -> OnnxModule:
        if self.model is None:
            raise ModelError("call qat.prepare(example_inputs) first")
        return self.model

    def _observe_all(self, run: Any) -> None:
        m = self._require()
        m.calibrating = True
        for _, fq in m.roots():
            fq.enable_observer(True).enable_fake_quant(False)
        try:
            run()
        finally:
            m.calibrating = False
            self._apply_schedule()

    # ------------------------------------------------------------------ schedule
    def _apply_schedule(self) -> None:
        m = self._require()
        observe = self.schedule.observers_on(self.step_count)
        fake = self.schedule.fake_quant_on(self.step_count)
        for root, fq in m.roots():
            on = observe and root not in self._frozen
            if fq.spec.learnable_scale and fake and fq.initialized:
                on = False  # LSQ: the observer initializes the scale, training takes over
            fq.enable_observer(on).enable_fake_quant(fake)
        m.bn_frozen = self.schedule.bn_frozen(self.step_count)

    def step(self) -> None:
        """Advance the schedule by one training step (call after ``optimizer.step()``)."""
        m = self._require()
        self.step_count += 1
        with torch.no_grad():
            for _, fq in m.roots():
                if isinstance(fq.scale, torch.nn.Parameter):
                    fq.scale.clamp_(min=_EPS)
        self._apply_schedule()

    # ------------------------------------------------------------------ calibration
    @contextlib.contextmanager
    def calibration_mode(self) -> Iterator[QATQuantizer]:
        """Within the block every observer runs and fake quantization is off (as on the ONNX side);
        forwards run without gradients and batch norm uses inference statistics."""
        m = self._require()
        if self._reset_on_calibration:
            for root, fq in m.roots():
                if m.root_site(root).kind == "activation":
                    fq.reset_observer()
            self._reset_on_calibration = False
        self._frozen.clear()
        m.calibrating = True
        for _, fq in m.roots():
            fq.enable_observer(True).enable_fake_quant(False)
        try:
            yield self
        finally:
            m.calibrating = False
            self._apply_schedule()

    def calibrate(self, batches: Iterable[Any]) -> int:
        """Run every batch through the mirror in calibration mode; returns the number of batches."""
        m = self._require()
        n = 0
        with self.calibration_mode():
            for batch in batches:
                m(*_as_args(batch))
                n += 1
        if n == 0:
            raise DataError("calibration data is empty: pass at least one batch")
        return n

    def load_qparams(self, source: Any, *, freeze: bool = False) -> None:
        """Start from the ONNX side's qparams (a Quantizer, its PreparedModel, a prepared QDQ model or a
        key -> QParams mapping). Min/max observers continue from the loaded ranges; with ``freeze``
        activation qparams stay fixed (weights still follow the schedule)."""
        m = self._require()
        qps = read_qparams(source)
        unknown = sorted(set(qps) - set(m.sites))
        if unknown:
            raise ConfigError(
                f"{len(unknown)} qparam keys are not fake-quant targets of the mirror (e.g. '{unknown[0]}'); build "
                "both sides from the same float model and config"
            )
        frozen: set[str] = set()
        for root, fq in m.roots():
            group = [k for k, s in m.sites.items() if s.root == root]
            key = root if root in qps else next((k for k in group if k in qps), None)
            if key is None:
                raise DataError(f"no qparams for target '{root}' in the source; it has {len(qps)} targets")
            qp = qps[key]
            if tuple(np.shape(qp.scale)) != tuple(fq.scale.shape):
                raise ModelError(f"target '{root}': scale shape {np.shape(qp.scale)} does not match the mirror's "
                                 f"{tuple(fq.scale.shape)}; the two sides use different granularity")
            fq.set_qparams(qp)
            if m.root_site(root).kind == "activation":
                _seed_range(fq, qp)
                if freeze:
                    frozen.add(root)
        self._frozen = frozen
        self._reset_on_calibration = True
        self._apply_schedule()

    # ------------------------------------------------------------------ results
    @property
    def plan(self) -> QuantPlan:
        """The annotate pass's plan (the ONNX Quantizer's, for the same float model and config)."""
        if self._quantizer is None:
            raise ModelError("call qat.prepare(example_inputs) first")
        return self._quantizer.plan

    @property
    def targets(self) -> dict[str, QuantTarget]:
        """Every planned QDQ pair, keyed by target key; each is one fake-quant site of the mirror."""
        return self.plan.targets

    @property
    def qparams(self) -> dict[str, QParams]:
        """Current scale/zero point of every target."""
        return self._require().qparams()

    def qdq_model(self) -> ir.Model:
        """The prepared QDQ model with the trained weights and qparams (a new ``onnx_ir.Model``)."""
        return self._require().to_onnx()

    def export(self, path: str | Path, example_inputs: Any = None, *, backend: Any = None,
               **backend_options: Any) -> Path:
        """Write the QDQ ONNX model with the trained weights and qparams, or its Core ML / Core AI conversion.

        Without ``backend`` the model is in the prepared format (``finalize_model`` accepts it); with
        ``onnxruntime`` it is finalized for it; with ``coreml`` / ``coreai`` it goes through the same
        lowering as :meth:`Quantizer.finalize` (``backend_options``: ``deployment_target``,
        ``compute_precision``, ``input_names``, ``output_names``) and ``path`` is a ``.mlpackage`` /
        ``.aimodel``. With ``example_inputs`` the result is checked against the mirror in eval mode
        (onnxruntime for ONNX, the lowered torch program for Core ML / Core AI) and the largest output
        difference logged; the Apple backends also trace with them.
        """
        from qdq.backends.artifact import BackendArtifact, check_suffix, is_torch_backend

        if backend is not None and is_torch_backend(backend):
            check_suffix(path, backend)
        model: Any = self.qdq_model()
        if backend is not None:
            examples = None if example_inputs is None else [np.asarray(_as_tensor(a)) for a in _as_args(example_inputs)]
            model = finalize_model(model, backend, example_inputs=examples, **backend_options)
        elif backend_options:
            raise ConfigError(f"{', '.join(sorted(backend_options))}: options of backend='coreml' / 'coreai'")
        out = save(model, path)
        if example_inputs is not None:
            if isinstance(model, BackendArtifact):
                diff = self._compare_outputs(model.run(*_as_args(example_inputs)), example_inputs)
            else:
                diff = self.compare_with_onnxruntime(model, example_inputs, level="none" if backend is None else "all")
            logger.info("export check: max |exported - torch mirror| over outputs = %.3g", diff)
        return out

    def compare_with_onnxruntime(self, model: Any, example_inputs: Any, *, level: str = "none") -> float:
        """Largest absolute output difference between ``model`` in onnxruntime (optimization ``level``)
        and the mirror in eval mode."""
        from qdq.calibration.runner import as_feeds
        from qdq.session import make_session

        m = self._require()
        args = _as_args(example_inputs)
        session = make_session(load_model(model), level=level)
        ort_out = session.run(None, as_feeds(args[0] if len(args) == 1 else args, m.input_names))
        return self._compare_outputs(ort_out, example_inputs)

    def _compare_outputs(self, outputs: list[Any], example_inputs: Any) -> float:
        """Largest absolute difference between ``outputs`` and the mirror's eval-mode outputs."""
        m = self._require()
        args = tuple(_as_tensor(a) for a in _as_args(example_inputs))
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                mine = m(*args)
        finally:
            m.train(was)
        mine = [mine] if isinstance(mine, torch.Tensor) else list(mine)
        return max(float(np.max(np.abs(np.asarray(o, np.float32) - t.detach().cpu().numpy().astype(np.float32))))
                   if np.size(o) else 0.0 for o, t in zip(outputs, mine))
