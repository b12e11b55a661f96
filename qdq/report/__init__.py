"""``qdq report``: one self-contained page on where a quantized model loses accuracy and what each layer buys.

:func:`build_report` measures, in onnxruntime, on the given data:

* model-level metrics (:func:`qdq.validate.compare`: SQNR, cosine, top-1 agreement, accuracy with labels);
* per layer (every compute node reading a dequantized value, named by node name and op type as configs name
  them): the **isolated** error (only this layer quantized, FP32 inputs; :mod:`qdq.report.layers`) next to
  the **accumulated** error (the quantized model's own tensor), both as SQNR against FP32;
* per quantized activation: scale, zero point, representable range, clipping ratio, quantization SQNR and a
  histogram (thumbnails for the worst);
* per-layer time from onnxruntime's profiler, quantized vs FP32 (fused kernels are matched by node name).

:func:`write_report` writes ``.html`` (matplotlib figures embedded as PNG, no network) or ``.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qdq.data import DataSource
from qdq.errors import DataError, ModelError, first_line
from qdq.metrics import OutputMetrics, Sqnr
from qdq.model_inputs import iter_chunks, model_inputs
from qdq.model_io import write_text
from qdq.progress import progress_bar
from qdq.report.layers import ActivationStats, Layer, plan_layers
from qdq.session import make_session, run, session_options

__all__ = ["LayerRow", "Report", "build_report", "write_report"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerRow:
    name: str
    op_type: str
    tensor: str
    isolated_db: float
    accumulated_db: float
    quant_ms: float | None = None
    fp32_ms: float | None = None


@dataclasses.dataclass
class Report:
    fp32_model: str
    quant_model: str
    num_samples: int
    outputs: list[OutputMetrics]
    layers: list[LayerRow]
    activations: list[ActivationStats]
    skipped: list[str]
    created: str = dataclasses.field(default_factory=lambda: datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))

    def worst_layers(self, n: int = 10) -> list[LayerRow]:
        return sorted(self.layers, key=lambda r: r.isolated_db)[:n]


def _load(path: Any, label: str) -> onnx.ModelProto:
    if isinstance(path, onnx.ModelProto):
        return path
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{label} model not found: {p}")
    try:
        return onnx.load(str(p))
    except Exception as exc:
        raise ModelError(f"the {label} model {p} is not a readable ONNX model ({first_line(exc)})") from exc


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _same_opset(fp32: onnx.ModelProto, quant: onnx.ModelProto) -> onnx.ModelProto:
    """The FP32 model at the quantized model's opset (the analysis model holds nodes of both)."""
    want = _opset(quant)
    if _opset(fp32) >= want:
        return fp32
    import onnx_ir as ir

    from qdq.graph.opset import upgrade_model

    return ir.serde.serialize_model(upgrade_model(ir.from_proto(fp32), want))


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, DataSource):
        return data.batches(batch_size)
    if isinstance(data, (np.ndarray, dict)):
        return [data]
    return data


def build_report(fp32_model: Any, quant_model: Any, data: Any, *, labels: Any = None, batch_size: int = 32,
                 progress: bool = True, profile_runs: int = 5) -> Report:
    """Measure ``quant_model`` against ``fp32_model`` on ``data`` (a DataSource, an array or a list of batches)."""
    from qdq.validate import compare, restored_fp8_pairs

    if not isinstance(data, (DataSource, np.ndarray, dict)) and iter(data) is data:
        data = list(data)  # read three times: metrics, layers, profile
    fp_proto, q_proto = _load(fp32_model, "FP32"), _load(quant_model, "quantized")
    summary = compare(fp32_model, quant_model, data, labels=labels, batch_size=batch_size, progress=progress)
    analysed = restored_fp8_pairs(q_proto)  # float8 activations finalized as casts: analysed as the Q/DQ pairs
    plan = plan_layers(_same_opset(fp_proto, analysed), analysed)
    if not plan.layers:
        raise ModelError("the quantized model has no quantized layer (no node reads a DequantizeLinear): nothing in "
                         "it was quantized, so there is no layer to report; `qdq compare` still compares the outputs")
    acts = {a.tensor: a for a in plan.activations}
    fp_fetch = list(dict.fromkeys([ly.output for ly in plan.layers] + [ly.isolated for ly in plan.layers] + list(acts)))
    q_fetch = list(dict.fromkeys(ly.output for ly in plan.layers))
    fp_sess = make_session(plan.model, level="none", extra_outputs=fp_fetch, label="analysis model")
    q_sess = make_session(q_proto, level="none", extra_outputs=q_fetch, label="quantized model")
    iso = {ly.name: Sqnr() for ly in plan.layers}
    acc = {ly.name: Sqnr() for ly in plan.layers}
    inputs = model_inputs(fp_proto)
    q_inputs = model_inputs(q_proto)
    seen = 0
    first_feeds: dict[str, np.ndarray] | None = None
    for batch in progress_bar(_batches(data, batch_size), desc="report", disable=not progress, unit="batch"):
        feeds = inputs.feeds(batch, f"evaluation batch at sample {seen}")
        for chunk in iter_chunks(feeds, inputs):
            if first_feeds is None:
                first_feeds = chunk.feeds
            ref = dict(zip(fp_fetch, run(fp_sess, fp_fetch, chunk.feeds, start=seen), strict=True))
            q_feeds = q_inputs.feeds(chunk.feeds, known_only=True)
            test = dict(zip(q_fetch, run(q_sess, q_fetch, q_feeds, start=seen), strict=True))
            for ly in plan.layers:
                want = chunk.unpad(ref[ly.output])
                iso[ly.name].update(want, chunk.unpad(ref[ly.isolated]))
                acc[ly.name].update(want, chunk.unpad(test[ly.output]))
            for name, stats in acts.items():
                stats.update(ref[name])
            seen += chunk.real
            del ref, test
    if seen == 0:
        raise DataError("evaluation data is empty: pass at least one sample")
    del fp_sess, q_sess
    assert first_feeds is not None
    q_ms = _profile(q_proto, first_feeds, profile_runs)
    fp_ms = _profile(fp_proto, first_feeds, profile_runs)
    rows = [LayerRow(ly.name, ly.op_type, ly.output, iso[ly.name].db, acc[ly.name].db,
                     _match(ly, q_ms), _match(ly, fp_ms)) for ly in plan.layers]
    return Report(_label(fp32_model), _label(quant_model), summary.num_samples, summary.outputs, rows, plan.activations,
                  plan.skipped)


def _label(model: Any) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else "(in memory)"


def _profile(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Mean kernel milliseconds per node name of onnxruntime's optimized graph."""
    import onnxruntime as ort

    if runs <= 0:
        return {}
    with tempfile.TemporaryDirectory(prefix="qdq-profile-") as tmp:
        opts = session_options("all")  # qdq's quiet options at the deployment level, plus the profiler
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "p")
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        f = {k: v for k, v in feeds.items() if k in wanted}
        sess.run(None, f)
        for _ in range(runs):
            sess.run(None, f)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs_ = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    warm_end = runs_[0][1] if runs_ else -1  # the first run allocates and packs weights: not timed
    out: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] > warm_end:
            name = e["name"][: -len("_kernel_time")]
            out[name] = out.get(name, 0.0) + e["dur"] / 1000.0 / runs
    return out


def _match(layer: Layer, times: dict[str, float]) -> float | None:
    """The layer's time: its own node, or the fused kernels onnxruntime named after it (``NAME_...``)."""
    for key in (layer.name, *layer.aliases):
        hits = [t for name, t in times.items() if name == key or name.startswith(key + "_")]
        if hits:
            return sum(hits)
    return None


def write_report(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as ``.html`` or ``.md`` (atomically: a temporary file renamed into place)."""
    from qdq.report.render import render_html, render_markdown

    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".md"):
        raise ModelError(f"report path must end in .html or .md, got {out.name!r}")
    text = render_markdown(report) if suffix == ".md" else render_html(report)
    write_text(out, text)
    return out
