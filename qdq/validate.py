"""How far a quantized ONNX model is from its FP32 original, measured in onnxruntime.

:func:`compare` runs both models on the same batches and accumulates, per model output,
signal power ``sum(ref**2)`` and noise power ``sum((ref - quant)**2)`` (SQNR in dB), top-1
agreement (argmax over the last axis) and, given labels, the top-1 accuracy of both models.
With ``per_layer=True`` it also measures every quantized activation: each QuantizeLinear ->
DequantizeLinear pair on a non-constant tensor ``x`` in the quantized model is compared with
tensor ``x`` of the FP32 model (same name), both fetched as extra graph outputs.

Everything streams: running sums are updated per batch and the batch's tensors dropped, so
memory does not grow with the number of samples or layers seen.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qdq.data import DataSource
from qdq.errors import DataError, ModelError, first_line
from qdq.progress import progress_bar

__all__ = [
    "ModelLike",
    "Optimization",
    "CompareReport",
    "OutputMetrics",
    "LayerMetrics",
    "QuantizedActivation",
    "compare",
    "sqnr_db",
    "make_session",
    "run_model",
    "input_shapes",
    "find_quantized_activations",
]

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model
#: onnxruntime graph optimization level: "all" runs the fused int8 kernels a deployment would use;
#: "disabled" keeps every QuantizeLinear/DequantizeLinear node (needed to fetch per-layer tensors).
Optimization = Literal["all", "basic", "disabled"]

_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")




# ----------------------------------------------------------------------------- metrics


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10*log10(sum(ref^2) / sum((ref-test)^2))`` in dB (inf if equal)."""
    acc = _Sqnr()
    acc.update(np.asarray(ref), np.asarray(test))
    return acc.db


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class _Sqnr:
    """Running signal and noise power (float64) plus the largest absolute difference."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.shape != test.shape:
            raise ModelError(f"reference shape {ref.shape} != quantized shape {test.shape}; compare the same model")
        r = ref.astype(np.float64, copy=False).ravel()
        d = r - test.astype(np.float64, copy=False).ravel()
        self.signal += float(np.dot(r, r))
        self.noise += float(np.dot(d, d))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))

    @property
    def db(self) -> float:
        return _db(self.signal, self.noise)


def _top1(x: np.ndarray) -> np.ndarray | None:
    """Argmax over the last axis for outputs that look like scores (2+ dims, 2+ classes), else None."""
    if x.ndim < 2 or x.shape[-1] < 2:
        return None
    return np.argmax(x, axis=-1)


class _Counter:
    """Matches over comparisons, e.g. top-1 agreement or correct predictions."""

    def __init__(self) -> None:
        self.hits = 0
        self.total = 0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        self.hits += int(np.count_nonzero(a == b))
        self.total += int(a.size)

    @property
    def rate(self) -> float | None:
        return self.hits / self.total if self.total else None


@dataclass(frozen=True)
class OutputMetrics:
    """One model output: SQNR, top-1 agreement and (with labels) both accuracies, rates in 0..1."""

    name: str
    sqnr_db: float
    max_abs_diff: float
    top1_agreement: float | None = None  #: None when the output is not scores (fewer than 2 dims/classes)
    fp32_accuracy: float | None = None  #: None without labels or when the output is not [N, classes]
    quant_accuracy: float | None = None


@dataclass(frozen=True)
class LayerMetrics:
    """One quantized activation: FP32 tensor ``name`` vs its QuantizeLinear->DequantizeLinear output."""

    name: str
    sqnr_db: float
    max_abs_diff: float
    node: str  #: the QuantizeLinear node


@dataclass
class CompareReport:
    """Result of :func:`compare`; ``layers`` is sorted worst (lowest SQNR) first."""

    num_samples: int
    outputs: list[OutputMetrics]
    layers: list[LayerMetrics] = field(default_factory=list)
    skipped_layers: list[str] = field(default_factory=list)  #: quantized tensors missing from the FP32 model
    optimization: str = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become the strings "inf", "-inf", "nan"."""
        return _json_safe(asdict(self))

    def format(self) -> str:
        """Readable text tables: per output, then per quantized activation (worst first)."""
        lines = [f"compared {self.num_samples} samples (onnxruntime {', '.join(self.providers)}, "
                 f"graph optimization: {self.optimization})"]
        has_acc = any(o.fp32_accuracy is not None for o in self.outputs)
        head = ["output", "SQNR dB", "top-1 agree", "max |diff|"] + (["FP32 acc", "quant acc", "delta"] if has_acc else [])
        rows = []
        for o in self.outputs:
            row = [o.name, _fmt_db(o.sqnr_db), _fmt_pct(o.top1_agreement), f"{o.max_abs_diff:.4g}"]
            if has_acc:
                delta = (None if o.fp32_accuracy is None or o.quant_accuracy is None
                         else o.quant_accuracy - o.fp32_accuracy)
                row += [_fmt_pct(o.fp32_accuracy), _fmt_pct(o.quant_accuracy),
                        "-" if delta is None else f"{100 * delta:+.2f} pt"]
            rows.append(row)
        lines += _table(head, rows)
        if self.layers:
            lines += ["", f"per-layer SQNR, worst first ({len(self.layers)} quantized activations):"]
            lines += _table(["tensor", "SQNR dB", "max |diff|", "QuantizeLinear"],
                            [[m.name, _fmt_db(m.sqnr_db), f"{m.max_abs_diff:.4g}", m.node] for m in self.layers])
        if self.skipped_layers:
            lines.append(f"not in the FP32 model, skipped: {', '.join(self.skipped_layers)}")
        return "\n".join(lines)


def _fmt_db(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:.2f}"


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ----------------------------------------------------------------------------- models and sessions


@dataclass
class _Model:
    """A model as onnxruntime will get it: a file path, or a proto plus the folder of its external data."""

    label: str
    path: Path | None = None
    proto: onnx.ModelProto | None = None
    external_dir: Path | None = None

    def graph(self) -> onnx.ModelProto:
        """The proto (weights of path models stay on disk), loaded once."""
        if self.proto is None:
            assert self.path is not None
            try:
                self.proto = onnx.load(str(self.path), load_external_data=False)
            except Exception as exc:
                raise ModelError(f"{self.path} is not a readable ONNX model ({first_line(exc)})") from exc
            self.external_dir = self.path.parent
        return self.proto


def _as_model(model: ModelLike, label: str) -> _Model:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"{label} model not found: {path}")
        return _Model(f"{label} model {path}", path=path)
    if isinstance(model, onnx.ModelProto):
        return _Model(f"{label} model", proto=model)
    if isinstance(model, ir.Model):
        return _Model(f"{label} model", proto=ir.serde.serialize_model(model))
    raise ModelError(f"{label} model must be a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _session(model: _Model, extra_outputs: Sequence[str], *, providers: Sequence[str], optimization: Optimization,
             intra_op_num_threads: int) -> tuple[ort.InferenceSession, list[str]]:
    """A session with ``extra_outputs`` appended as graph outputs; returns it and the original output names."""
    opts = ort.SessionOptions()
    if optimization not in _LEVELS:
        raise ModelError(f"optimization must be one of {', '.join(_LEVELS)}, got {optimization!r}")
    opts.graph_optimization_level = _LEVELS[optimization]
    opts.intra_op_num_threads = intra_op_num_threads
    opts.log_severity_level = 3
    try:
        if model.path is not None and model.proto is None and not extra_outputs:
            sess = ort.InferenceSession(str(model.path), opts, providers=list(providers))
            return sess, [o.name for o in sess.get_outputs()]
        proto = model.graph()
        original = [o.name for o in proto.graph.output]
        added = [n for n in dict.fromkeys(extra_outputs) if n not in original]
        # Outputs without type or shape: onnxruntime infers both, so no shape inference is needed.
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in added)
        try:
            blob = proto.SerializeToString()
        except ValueError as exc:
            raise ModelError(f"{model.label} is over 2 GiB in memory; save it with external data and pass the "
                             "path") from exc
        finally:
            del proto.graph.output[len(original):]
        if model.external_dir is not None:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(model.external_dir))
        return ort.InferenceSession(blob, opts, providers=list(providers)), original
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the {model.label}: {first_line(exc)}") from exc


def make_session(model: ModelLike, *, extra_outputs: Sequence[str] = (),
                 providers: Sequence[str] = ("CPUExecutionProvider",), optimization: Optimization = "all",
                 intra_op_num_threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` that also returns the intermediate tensors ``extra_outputs``."""
    sess, _ = _session(_as_model(model, "the"), extra_outputs, providers=providers, optimization=optimization,
                       intra_op_num_threads=intra_op_num_threads)
    return sess


def run_model(model: ModelLike | ort.InferenceSession, batches: Iterable[Mapping[str, np.ndarray]], *,
              providers: Sequence[str] = ("CPUExecutionProvider",), optimization: Optimization = "all",
              intra_op_num_threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` on each batch and yield ``{output name: array}`` (one batch at a time)."""
    sess = model if isinstance(model, ort.InferenceSession) else make_session(
        model, providers=providers, optimization=optimization, intra_op_num_threads=intra_op_num_threads)
    names = [o.name for o in sess.get_outputs()]
    inputs = sess.get_inputs()
    start = 0
    for batch in batches:
        feeds = _feeds(batch, inputs)
        yield dict(zip(names, _run(sess, names, feeds, start)))
        start += _batch_len(feeds)


def input_shapes(model: ModelLike) -> dict[str, tuple[int | str | None, ...]]:
    """Model input shapes (dynamic dims as their name or None), e.g. for ``open_data(input_shapes=...)``."""
    graph = _as_model(model, "the").graph().graph
    inits = {t.name for t in graph.initializer}
    out: dict[str, tuple[int | str | None, ...]] = {}
    for vi in graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    return out


# ----------------------------------------------------------------------------- quantized activations


@dataclass(frozen=True)
class QuantizedActivation:
    """A QuantizeLinear->DequantizeLinear pair on a computed tensor: ``reference`` is its float input."""

    reference: str  #: the float tensor x (same name in the FP32 model)
    quantized: str  #: the DequantizeLinear output
    node: str  #: the QuantizeLinear node name


def find_quantized_activations(model: onnx.ModelProto) -> list[QuantizedActivation]:
    """QuantizeLinear nodes whose input is not an initializer/Constant and that feed a DequantizeLinear."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" and n.domain in _QDQ_DOMAINS for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or node.domain not in _QDQ_DOMAINS or node.input[0] in constants:
            continue
        dq = next((c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        if dq is not None:
            # qdq records the FP32 tensor name (a quantized graph output's float tensor is renamed).
            meta = {p.key: p.value for p in node.metadata_props}
            reference = meta.get("qdq.tensor", node.input[0])
            found.append(QuantizedActivation(reference, dq.output[0], node.name or f"QuantizeLinear_{i}"))
    return found


def _value_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {v.name for v in graph.input} | {o for n in graph.node for o in n.output}


# ----------------------------------------------------------------------------- running


def _feeds(batch: Mapping[str, Any], inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Check batch keys against the model inputs; float arrays go to the model's float32 where it wants that."""
    if not isinstance(batch, Mapping):
        raise DataError(f"batches must be dicts of input name -> array, got {type(batch).__name__}")
    names = [i.name for i in inputs]
    if set(batch) != set(names):
        raise DataError(f"data has inputs ({', '.join(map(str, batch))}) but the model expects ({', '.join(names)}); "
                        "name the arrays after the model inputs")
    feeds = {}
    for inp in inputs:
        x = np.asarray(batch[inp.name])
        if inp.type == "tensor(float)" and x.dtype != np.float32:
            x = x.astype(np.float32)
        feeds[inp.name] = np.ascontiguousarray(x)
    return feeds


def _batch_len(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _run(sess: ort.InferenceSession, names: Sequence[str], feeds: Mapping[str, np.ndarray],
         start: int) -> list[np.ndarray]:
    try:
        return sess.run(list(names), dict(feeds))
    except Exception as exc:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in feeds.items())
        raise DataError(f"onnxruntime failed on the batch at sample {start} ({shapes}): {first_line(exc)}; "
                        "check the data matches the model inputs") from exc


def _fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size when every model input has a fixed first dim, else None."""
    dims = [i.shape[0] if i.shape else None for i in sess.get_inputs()]
    if dims and all(isinstance(d, int) and d > 0 for d in dims) and len(set(dims)) == 1:
        return int(dims[0])
    return None


def _pad(feeds: dict[str, np.ndarray], n: int, fixed: int | None, start: int) -> dict[str, np.ndarray]:
    """Repeat the last sample up to a fixed model batch size (outputs are cut back to n afterwards)."""
    if fixed is None or n == fixed:
        return feeds
    if n > fixed:
        raise DataError(f"the model has a fixed batch size of {fixed} but the batch at sample {start} has {n} "
                        f"samples; feed batches of {fixed}")
    return {k: np.concatenate([v, np.repeat(v[-1:], fixed - n, axis=0)]) for k, v in feeds.items()}


def _pair_outputs(fp: list[str], q: list[str]) -> list[tuple[str, str]]:
    if set(fp) == set(q):
        return [(n, n) for n in fp]
    if len(fp) == len(q):
        logger.warning("output names differ (%s vs %s): pairing them by position", fp, q)
        return list(zip(fp, q))
    raise ModelError(f"the FP32 model has outputs ({', '.join(fp)}) but the quantized model ({', '.join(q)}); "
                     "compare a model with its own quantized version")


def _labels(labels: Any, data: Any) -> np.ndarray | None:
    """Labels as int64, checked against the data length when it is known up front."""
    if labels is None:
        return None
    arr = np.asarray(labels).reshape(-1)
    if arr.dtype.kind not in "iu":
        raise DataError(f"labels must be integers, got {arr.dtype}")
    if isinstance(data, DataSource) and len(arr) != len(data) and not (
            len(arr) == data.total_samples and len(arr) > len(data)):
        raise DataError(f"{len(arr)} labels but {len(data)} samples in {data.path}; give one label per sample")
    return arr.astype(np.int64)


def compare(
    fp32_model: ModelLike,
    quant_model: ModelLike,
    data: DataSource | Iterable[Mapping[str, np.ndarray]],
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    per_layer: bool = False,
    batch_size: int = 32,
    progress: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    optimization: Optimization | None = None,
    intra_op_num_threads: int = 0,
) -> CompareReport:
    """Run ``fp32_model`` and ``quant_model`` on ``data`` and measure how far the quantized outputs drift.

    ``data`` is a :class:`~qdq.data.DataSource` (read in ``batch_size`` batches) or any iterable of
    ``{input name: array}`` batches. ``labels`` (one int per sample, in data order) adds top-1
    accuracy for outputs shaped [N, classes]. ``optimization`` defaults to "all" (the fused int8
    kernels a deployment runs) and to "disabled" with ``per_layer`` so no Q/DQ node is fused away.
    A model with a fixed batch size is fed batches of that size (a short last batch is padded).
    """
    level: Optimization = optimization or ("disabled" if per_layer else "all")
    fp, q = _as_model(fp32_model, "FP32"), _as_model(quant_model, "quantized")
    probes: list[QuantizedActivation] = []
    skipped: list[str] = []
    if per_layer:
        fp_names = _value_names(fp.graph())
        for p in find_quantized_activations(q.graph()):
            (probes if p.reference in fp_names else skipped).append(p)
        if skipped:
            logger.warning("quantized tensors not found in the FP32 model: %s", ", ".join(p.reference for p in skipped))
    kw: dict[str, Any] = {"providers": providers, "optimization": level, "intra_op_num_threads": intra_op_num_threads}
    fp_sess, fp_out = _session(fp, [p.reference for p in probes], **kw)
    q_sess, q_out = _session(q, [p.quantized for p in probes], **kw)

    inputs = fp_sess.get_inputs()
    in_names = [i.name for i in inputs]
    q_in = [i.name for i in q_sess.get_inputs()]
    if set(in_names) != set(q_in):
        raise DataError(f"the FP32 model inputs ({', '.join(in_names)}) differ from the quantized model inputs "
                        f"({', '.join(q_in)}); compare a model with its own quantized version")
    if isinstance(data, DataSource) and set(data.input_names) != set(in_names):
        raise DataError(f"data {data.path} was opened for inputs ({', '.join(data.input_names)}) but the model "
                        f"inputs are ({', '.join(in_names)}); open it with the model's input names")
    pairs = _pair_outputs(fp_out, q_out)
    label_arr = _labels(labels, data)

    fp_fetch = list(dict.fromkeys(fp_out + [p.reference for p in probes]))
    q_fetch = list(dict.fromkeys(q_out + [p.quantized for p in probes]))
    out_sqnr = {a: _Sqnr() for a, _ in pairs}
    agree = {a: _Counter() for a, _ in pairs}
    acc_fp = {a: _Counter() for a, _ in pairs}
    acc_q = {a: _Counter() for a, _ in pairs}
    layer_sqnr = [_Sqnr() for _ in probes]

    fixed = _fixed_batch(fp_sess)
    if isinstance(data, DataSource):
        size = fixed or batch_size
        if fixed and fixed != batch_size:
            logger.info("the model has a fixed batch size of %d: using it instead of %d", fixed, batch_size)
        batches: Iterable[Mapping[str, np.ndarray]] = data.batches(size)
        total: int | None = -(-len(data) // size)
    else:
        batches, total = data, None
    seen = 0
    for batch in progress_bar(batches, total=total, desc="compare", disable=not progress, unit="batch"):
        feeds = _feeds(batch, inputs)
        n = _batch_len(feeds)
        feeds = _pad(feeds, n, fixed, seen)
        ref = dict(zip(fp_fetch, _run(fp_sess, fp_fetch, feeds, seen)))
        test = dict(zip(q_fetch, _run(q_sess, q_fetch, feeds, seen)))
        if fixed is not None and n != fixed:
            ref = {k: v[:n] if v.ndim and v.shape[0] == fixed else v for k, v in ref.items()}
            test = {k: v[:n] if v.ndim and v.shape[0] == fixed else v for k, v in test.items()}
        batch_labels = None
        if label_arr is not None:
            if seen + n > len(label_arr):
                raise DataError(f"{len(label_arr)} labels but the data has more samples; give one label per sample")
            batch_labels = label_arr[seen:seen + n]
        for a, b in pairs:
            out_sqnr[a].update(ref[a], test[b])
            top_r, top_q = _top1(ref[a]), _top1(test[b])
            if top_r is None or top_q is None:
                continue
            agree[a].update(top_r, top_q)
            if batch_labels is not None and top_r.size == n and top_r.shape[0] == n:
                acc_fp[a].update(top_r.reshape(n), batch_labels)
                acc_q[a].update(top_q.reshape(n), batch_labels)
        for p, acc in zip(probes, layer_sqnr):
            acc.update(ref[p.reference], test[p.quantized])
        seen += n
    if seen == 0:
        raise DataError("evaluation data is empty: no batches to compare; pass at least one sample")
    if label_arr is not None and not isinstance(data, DataSource) and seen != len(label_arr):
        raise DataError(f"{len(label_arr)} labels but {seen} samples; give one label per sample")

    outputs = [OutputMetrics(a, out_sqnr[a].db, out_sqnr[a].max_abs, agree[a].rate, acc_fp[a].rate, acc_q[a].rate)
               for a, _ in pairs]
    layers = sorted((LayerMetrics(p.reference, s.db, s.max_abs, p.node) for p, s in zip(probes, layer_sqnr)),
                    key=lambda m: m.sqnr_db)
    return CompareReport(seen, outputs, layers, [p.reference for p in skipped], level, tuple(providers))
