"""How far a quantized ONNX model is from its FP32 original, measured in onnxruntime.

:func:`compare` runs both models on the same batches and accumulates, per model output, SQNR,
mean per-sample cosine similarity, max |diff|, top-1 agreement (outputs that look like class
scores: [N, classes], not produced by a pooling or normalising op)
and, given labels, the top-1 accuracy of both models (:mod:`qdq.metrics`). Models and data are
taken as :func:`qdq.quantize` takes them (paths, protos, ``onnx_ir`` models; a data path, a
DataSource or batches) and fed as the model declares its inputs (:mod:`qdq.model_inputs`):
int64 ids, float16 inputs, several inputs and outputs, static batches (run in chunks of the
model's batch, padding dropped). With ``per_layer=True`` it also measures every quantized
activation: each QuantizeLinear -> DequantizeLinear pair on a non-constant tensor ``x`` in the
quantized model is compared with tensor ``x`` of the FP32 model, both fetched as extra outputs.

Everything streams: running sums are updated per run and the run's tensors dropped, so memory
does not grow with the number of samples or layers seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qdq.data import DataSource, open_data
from qdq.errors import DataError, ModelError, first_line
from qdq.metrics import (
    CompareReport,
    Cosine,
    Counter,
    LayerMetrics,
    NeighbourAgreement,
    OutputMetrics,
    ScoreSample,
    Sqnr,
    is_linear_head,
    sqnr_db,
    top1,
)
from qdq.model_inputs import Chunk, ModelInputs, iter_chunks, model_inputs
from qdq.progress import progress_bar
from qdq.session import DEFAULT_PROVIDERS, opt_level, run, run_batched
from qdq.session import make_session as _make_session

__all__ = [
    "CompareReport",
    "LayerMetrics",
    "ModelLike",
    "Optimization",
    "OutputMetrics",
    "QuantizedActivation",
    "compare",
    "find_quantized_activations",
    "input_shapes",
    "make_session",
    "run_model",
    "sqnr_db",
]

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model
#: onnxruntime graph optimization level: "all" runs the fused int8 kernels a deployment would use;
#: "disabled" (= "none") keeps every QuantizeLinear/DequantizeLinear node (needed for per-layer tensors).
Optimization = Literal["all", "extended", "basic", "disabled", "none"]

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


# ----------------------------------------------------------------------------- models and sessions


@dataclass
class _Model:
    """A model to compare: the object onnxruntime gets (path or proto) and, loaded on demand, its graph."""

    label: str
    source: Any
    proto: onnx.ModelProto | None = None

    def graph(self) -> onnx.ModelProto:
        """The proto (weights of path models stay on disk), loaded once."""
        if self.proto is None:
            try:
                self.proto = onnx.load(str(self.source), load_external_data=False)
            except Exception as exc:
                raise ModelError(f"the {self.label} is not a readable ONNX model ({first_line(exc)}); "
                                 "pass an .onnx file") from exc
        return self.proto

    def inputs(self) -> ModelInputs:
        return model_inputs(self.graph())

    def session(self, extra: Sequence[str], **kw: Any) -> tuple[ort.InferenceSession, list[str]]:
        """A session fetching ``extra`` too; returns it and the model's own output names."""
        src = self.source if isinstance(self.source, (str, os.PathLike)) else self.graph()
        sess = _make_session(src, extra_outputs=extra, label=self.label, **kw)
        original = [o.name for o in self.graph().graph.output]
        return sess, original


def _as_model(model: ModelLike, label: str) -> _Model:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"{label} model not found: {path}")
        return _Model(f"{label} model {path}", path)
    if isinstance(model, onnx.ModelProto):
        return _Model(f"{label} model", model, model)
    if isinstance(model, ir.Model):
        return _Model(f"{label} model", model, ir.serde.serialize_model(model))
    raise ModelError(f"{label} model must be a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def make_session(model: ModelLike, *, extra_outputs: Sequence[str] = (), providers: Sequence[str] = DEFAULT_PROVIDERS,
                 optimization: Optimization = "all", intra_op_num_threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` that also returns the intermediate tensors ``extra_outputs``.

    Kept for compatibility; :func:`qdq.session.make_session` is the one session builder.
    """
    return _make_session(model, level=optimization, threads=intra_op_num_threads, extra_outputs=extra_outputs,
                         providers=providers)


def run_model(model: ModelLike | ort.InferenceSession, batches: Iterable[Any], *,
              providers: Sequence[str] = DEFAULT_PROVIDERS, optimization: Optimization = "all",
              intra_op_num_threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` on each batch (dict by input name, array or tuple) and yield ``{output name: array}``.

    Inputs are fed as the model declares them; a static batch runs in chunks of the model's batch.
    """
    if isinstance(model, ort.InferenceSession):
        sess = model
        inputs = _session_inputs(sess)
    else:
        sess = make_session(model, providers=providers, optimization=optimization,
                            intra_op_num_threads=intra_op_num_threads)
        inputs = model_inputs(model)
    names = [o.name for o in sess.get_outputs()]
    start = 0
    for batch in batches:
        feeds = inputs.feeds(batch, f"the batch at sample {start}")
        yield dict(zip(names, run_batched(sess, feeds, inputs, names, start=start)))
        start += inputs.batch_len(feeds) or 1


def _session_inputs(sess: ort.InferenceSession) -> ModelInputs:
    """The input signature of a session (onnxruntime's type strings to element types)."""
    from qdq.model_inputs import InputSpec

    specs = []
    for i in sess.get_inputs():
        elem = onnx.helper.np_dtype_to_tensor_dtype(_ORT_TYPES.get(i.type, np.dtype(np.float32)))
        shape = tuple(d if isinstance(d, int) else (d or None) for d in i.shape) if i.shape is not None else None
        specs.append(InputSpec(i.name, ir.DataType(elem), shape))
    return ModelInputs(specs)


_ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(double)": np.dtype(np.float64), "tensor(int64)": np.dtype(np.int64),
              "tensor(int32)": np.dtype(np.int32), "tensor(int8)": np.dtype(np.int8),
              "tensor(uint8)": np.dtype(np.uint8), "tensor(bool)": np.dtype(np.bool_)}


def input_shapes(model: ModelLike) -> dict[str, tuple[int | str | None, ...]]:
    """Required model input shapes (dynamic dims as their name or None), e.g. for ``open_data(input_shapes=...)``."""
    sig = model_inputs(model)
    return {s.name: s.shape if s.shape is not None else () for s in sig.required}


# ----------------------------------------------------------------------------- quantized activations


@dataclass(frozen=True)
class QuantizedActivation:
    """A QuantizeLinear->DequantizeLinear pair on a computed tensor: ``reference`` is its float input."""

    reference: str  #: the float tensor x (same name in the FP32 model)
    quantized: str  #: the DequantizeLinear output
    node: str  #: the QuantizeLinear node name
    #: a QuantizeLinear read only by integer kernels (MatMulIntegerToFloat): no DequantizeLinear to fetch, so the
    #: session gets one (this node) producing ``quantized``
    probe: onnx.NodeProto | None = None


def find_quantized_activations(model: onnx.ModelProto) -> list[QuantizedActivation]:
    """QuantizeLinear nodes whose input is not an initializer/Constant and that feed a DequantizeLinear, and the
    float8 pairs a finalized model computes as casts (found as the pairs they replaced, under the same names)."""
    model = restored_fp8_pairs(model)
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
        readers = consumers.get(node.output[0], [])
        dq = next((c for c in readers if c.op_type == "DequantizeLinear"), None)
        # qdq records the FP32 tensor name (a quantized graph output's float tensor is renamed).
        meta = {p.key: p.value for p in node.metadata_props}
        reference = meta.get("qdq.tensor", node.input[0])
        name = node.name or f"QuantizeLinear_{i}"
        if dq is not None:
            found.append(QuantizedActivation(reference, dq.output[0], name))
        elif readers and all(c.op_type in _INTEGER_READERS for c in readers):
            out = f"{node.output[0]}__qdq_probe"
            attrs = [a for a in node.attribute if a.name in ("axis", "block_size")]
            probe = onnx.helper.make_node("DequantizeLinear", [node.output[0], *node.input[1:3]], [out],
                                          name=f"{name}__probe")
            probe.attribute.extend(attrs)
            found.append(QuantizedActivation(reference, out, name, probe))
    return found


def restored_fp8_pairs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with float8 activations written as casts turned back into Q -> DQ pairs (a copy), or ``model``
    itself when it has none (:func:`qdq.passes.fp8_activations_as_casts.restore_fp8_pairs`)."""
    fp8 = (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)
    if not any(n.op_type == "Cast" and any(a.name == "to" and a.i in fp8 for a in n.attribute)
               for n in model.graph.node):
        return model
    from qdq.passes.fp8_activations_as_casts import restore_fp8_pairs

    copy = ir.from_proto(model)
    return ir.to_proto(copy) if restore_fp8_pairs(copy) else model


#: Integer kernels that read a QuantizeLinear output directly (qdq's onnxruntime finalize makes them).
_INTEGER_READERS = frozenset({"MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QLinearConv", "QGemm"})


def _with_probes(model: _Model, probes: Sequence[QuantizedActivation]) -> _Model:
    """``model`` with the DequantizeLinear nodes of probes that need one (a copy; the model is not changed)."""
    extra = [p.probe for p in probes if p.probe is not None]
    if not extra:
        return model
    proto = onnx.ModelProto()
    proto.CopyFrom(model.graph())
    proto.graph.node.extend(extra)
    return _Model(model.label, proto, proto)


#: Ops whose [N, D] output is a feature vector (pooled, normalised), not class scores: no top-1 for them.
_FEATURE_OPS = frozenset({"Div", "ReduceMean", "ReduceSum", "ReduceL2", "LpNormalization", "LayerNormalization",
                          "GlobalAveragePool", "GlobalMaxPool"})


def _score_outputs(model: onnx.ModelProto) -> set[str]:
    """Graph outputs that may be class scores: not produced by a pooling or normalising op (embeddings)."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return {o.name for o in model.graph.output if producers.get(o.name) not in _FEATURE_OPS}


def _token_score_outputs(model: onnx.ModelProto) -> set[str]:
    """Graph outputs written by a linear head (MatMul, Gemm, bias Add): [N, S, vocab] logits of an LM, a token
    classifier or CTC, whose per-token top-1 is compared."""
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}

    def op(name: str) -> str | None:
        node = producers.get(name)
        return node.op_type if node is not None else "Constant" if name in constants else None

    return {o.name for o in model.graph.output if o.name in producers
            and is_linear_head(op(o.name), [op(i) for i in producers[o.name].input])}


def _value_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {v.name for v in graph.input} | {o for n in graph.node for o in n.output}


# ----------------------------------------------------------------------------- running


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
    rows = data.rows_per_sample if isinstance(data, DataSource) else 1  # files of whole inputs: a label per row
    if isinstance(data, DataSource) and len(arr) != len(data) * rows and not (
            len(arr) == data.total_samples * rows and len(arr) > len(data) * rows):
        what = f"{len(data)} samples" if rows == 1 else f"{len(data) * rows} rows ({len(data)} whole inputs of {rows})"
        raise DataError(f"{len(arr)} labels but {what} in {data.path}; give one label per "
                        f"{'sample' if rows == 1 else 'row'}")
    return arr.astype(np.int64)


def _check_inputs(fp: ModelInputs, q: ModelInputs, data: Any) -> None:
    dropped = set(fp.names) - set(q.names)  # defaults the quantized model froze as weights may be gone
    if not set(q.names) <= set(fp.names) or any(not fp.by_name[n].optional for n in dropped):
        raise DataError(f"the FP32 model inputs ({', '.join(fp.names)}) differ from the quantized model inputs "
                        f"({', '.join(q.names)}); compare a model with its own quantized version")
    if fp.static_batch != q.static_batch:
        raise ModelError(f"the FP32 model has batch {fp.static_batch or 'dynamic'} but the quantized model "
                         f"{q.static_batch or 'dynamic'}; compare a model with its own quantized version")
    if isinstance(data, DataSource):
        names = set(data.input_names)
        if not set(fp.required_names) <= names or not names <= set(fp.names):
            raise DataError(f"data {data.path} was opened for inputs ({', '.join(data.input_names)}) but the model "
                            f"inputs are ({fp.expected()}); open it with the model's input names")


class _Accumulators:
    """Every running metric of one comparison."""

    def __init__(self, pairs: Sequence[tuple[str, str]], probes: Sequence[QuantizedActivation],
                 scores: set[str], token_scores: set[str] | frozenset[str] = frozenset()) -> None:
        self.pairs = list(pairs)
        self.scores = scores
        self.token_scores = token_scores  #: [N, S, classes] outputs: top-1 agreement per token
        self._warned_labels: set[str] = set()
        self.sqnr = {a: Sqnr() for a, _ in pairs}
        self.cosine = {a: Cosine() for a, _ in pairs}
        self.agree = {a: Counter() for a, _ in pairs}
        self.exact = {a: Counter() for a, _ in pairs}
        self.acc_fp = {a: Counter() for a, _ in pairs}
        self.acc_q = {a: Counter() for a, _ in pairs}
        self.neighbours = {a: NeighbourAgreement() for a, _ in pairs if a not in scores}
        self.score_rows = {a: ScoreSample() for a, _ in pairs}
        self.probes = list(probes)
        self.layers = [Sqnr() for _ in probes]

    def update(self, ref: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], n: int,
               labels: np.ndarray | None, mask: np.ndarray | None = None) -> None:
        for a, b in self.pairs:
            if ref[a].dtype.kind in "biu":  # ids, argmax, masks: how many elements are exactly equal
                if ref[a].shape != test[b].shape:  # a data-dependent shape (NonZero): nothing matches
                    self.exact[a].total += max(ref[a].size, test[b].size, 1)
                    continue
                self.exact[a].update(ref[a].ravel(), test[b].ravel())
                self.sqnr[a].update(ref[a], test[b])
                continue
            self.sqnr[a].update(ref[a], test[b])
            self.cosine[a].update(ref[a], test[b], n)
            if a not in self.scores:
                self.neighbours[a].update(ref[a], test[b], n)
                continue
            if ref[a].ndim == 3 and a in self.token_scores and ref[a].shape[-1] > 1 and ref[a].dtype.kind == "f":
                top_r, top_q = ref[a].argmax(-1), test[b].argmax(-1)  # per token; padding positions left out
                if mask is not None and mask.shape == top_r.shape:
                    top_r, top_q = top_r[mask], top_q[mask]
                self.agree[a].update(top_r, top_q)
                if labels is not None and a not in self._warned_labels:
                    self._warned_labels.add(a)
                    logger.warning("output '%s' holds token logits: labels (one per sample) are not compared", a)
                continue
            top_r, top_q = top1(ref[a]), top1(test[b])
            if top_r is None or top_q is None:
                continue
            self.agree[a].update(top_r, top_q)
            self.score_rows[a].update(ref[a], test[b])
            if labels is not None and top_r.shape[0] == n:
                classes = ref[a].shape[-1]
                bad = labels[(labels < 0) | (labels >= classes)]
                if bad.size:
                    raise DataError(f"label {int(bad[0])} is out of range for output '{a}' with {classes} classes; "
                                    f"give labels in 0..{classes - 1}, one per sample")
                self.acc_fp[a].update(top_r, labels)
                self.acc_q[a].update(top_q, labels)
        for p, acc in zip(self.probes, self.layers):
            acc.update(ref[p.reference], test[p.quantized])

    def outputs(self) -> list[OutputMetrics]:
        metrics = []
        for a, _ in self.pairs:
            expected = self.score_rows[a].result()
            metrics.append(OutputMetrics(
                a, self.sqnr[a].db, self.sqnr[a].max_abs, self.agree[a].rate, self.acc_fp[a].rate,
                self.acc_q[a].rate, self.cosine[a].mean, self.neighbours[a].rate if a in self.neighbours else None,
                None if expected is None else expected[0] / 100,
                None if expected is None else (expected[1][0] / 100, expected[1][1] / 100), self.exact[a].rate))
        return metrics

    def layer_metrics(self) -> list[LayerMetrics]:
        return sorted((LayerMetrics(p.reference, s.db, s.max_abs, p.node) for p, s in zip(self.probes, self.layers)),
                      key=lambda m: m.sqnr_db)


def token_mask(feeds: Mapping[str, np.ndarray], n: int) -> np.ndarray | None:
    """The real (non-padding) token positions of a batch: its ``attention_mask`` [n, S] as bool, if it has one."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return None
    return np.asarray(mask[:n]) != 0


def _cut(outs: dict[str, Any], chunk: Chunk) -> dict[str, np.ndarray]:
    """Drop the padded samples of a run (from tensors whose dim 0 is the batch). A sequence output (onnxruntime
    returns a list of tensors) is compared as its tensors' values, flattened and joined."""
    return {k: chunk.unpad(v) if isinstance(v, np.ndarray) else _joined(v) for k, v in outs.items()}


def _joined(seq: Any) -> np.ndarray:
    parts = [np.ravel(np.asarray(t)) for t in seq]
    return np.concatenate(parts) if parts else np.empty((0,), np.float32)


def _warn_if_saturating(model: onnx.ModelProto) -> None:
    """One warning when this CPU's U8S8 kernels saturate and ``model`` feeds them int8 weights."""
    from qdq.backends.host_cpu import u8s8_saturates
    from qdq.passes.weights_to_uint8 import int8_kernel_weights

    if not u8s8_saturates():
        return
    n = int8_kernel_weights(ir.from_proto(model))
    if n:
        logger.warning("this CPU (x86 without VNNI/AMX) adds onnxruntime's U8S8 products in saturating int16 and the "
                       "quantized model has %d int8 weights on such kernels: its numbers here may be far worse than "
                       "on a VNNI or ARM CPU; finalize with kernel_format='u8u8' (qdq quantize --kernel-format u8u8, "
                       "the default here) for exact integer kernels on every CPU", n)


def compare(
    fp32_model: ModelLike,
    quant_model: ModelLike,
    data: Any,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    per_layer: bool = False,
    batch_size: int = 32,
    progress: bool = True,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    optimization: Optimization | None = None,
    intra_op_num_threads: int = 0,
    num_samples: int | None = None,
) -> CompareReport:
    """Run ``fp32_model`` and ``quant_model`` on ``data`` and measure how far the quantized outputs drift.

    Models: paths, ``onnx.ModelProto`` or ``onnx_ir.Model``. ``data``: a path understood by
    :func:`qdq.data.open_data` (opened with the FP32 model's inputs, ``num_samples`` first
    samples), a :class:`~qdq.data.DataSource` (read in ``batch_size`` batches) or any iterable of
    batches (dicts by input name, arrays or tuples). ``labels`` (one int per sample, in data
    order) adds top-1 accuracy for outputs shaped [N, classes]. ``optimization`` defaults to
    "all" (the fused int8 kernels a deployment runs) and to "disabled" with ``per_layer`` so no
    Q/DQ node is fused away. A model with a static batch runs in chunks of its batch (a short
    last chunk is padded with copies, which are not measured).
    """
    level: str = optimization or ("disabled" if per_layer else "all")
    fused = opt_level(level) != "none"  # a bad name is a ConfigError before any work
    fp, q = _as_model(fp32_model, "FP32"), _as_model(quant_model, "quantized")
    fp_in, q_in = fp.inputs(), q.inputs()
    if fused:
        _warn_if_saturating(q.graph())
    if isinstance(data, (str, os.PathLike)):
        data = open_data(Path(data), fp_in, num_samples=num_samples, role="evaluation")
    _check_inputs(fp_in, q_in, data)
    probes: list[QuantizedActivation] = []
    skipped: list[QuantizedActivation] = []
    if per_layer:
        fp_names = _value_names(fp.graph())
        for p in find_quantized_activations(q.graph()):
            (probes if p.reference in fp_names else skipped).append(p)
        if skipped:
            logger.warning("quantized tensors not found in the FP32 model: %s", ", ".join(p.reference for p in skipped))
    kw: dict[str, Any] = {"providers": providers, "level": level, "threads": intra_op_num_threads}
    fp_sess, fp_out = fp.session([p.reference for p in probes], **kw)
    q_sess, q_out = _with_probes(q, probes).session([p.quantized for p in probes], **kw)
    pairs = _pair_outputs(fp_out, q_out)
    label_arr = _labels(labels, data)
    fp_fetch = list(dict.fromkeys(fp_out + [p.reference for p in probes]))
    q_fetch = list(dict.fromkeys(q_out + [p.quantized for p in probes]))
    acc = _Accumulators(pairs, probes, _score_outputs(fp.graph()), _token_score_outputs(fp.graph()))

    if isinstance(data, DataSource):
        batches: Iterable[Any] = data.batches(batch_size)
        total: int | None = -(-len(data) // data.effective_batch_size(batch_size))
    elif isinstance(data, np.ndarray) or hasattr(data, "detach"):
        batches, total = [data], 1
    else:
        batches, total = data, None
    seen = 0
    for batch in progress_bar(batches, total=total, desc="compare", disable=not progress, unit="batch"):
        where = f"evaluation batch at sample {seen}"
        feeds = fp_in.feeds(batch, where)
        n = fp_in.batch_len(feeds)
        if n == 0:
            continue
        n = n or 1
        if label_arr is not None and seen + n > len(label_arr):
            raise DataError(f"{len(label_arr)} labels but the data has more samples; give one label per sample")
        for chunk in iter_chunks(feeds, fp_in):
            q_chunk = q_in.feeds(chunk.feeds, where, known_only=True)  # the quantized model's dtypes and inputs
            at = seen + chunk.start
            ref = _cut(dict(zip(fp_fetch, run(fp_sess, fp_fetch, chunk.feeds, start=at))), chunk)
            test = _cut(dict(zip(q_fetch, run(q_sess, q_fetch, q_chunk, start=at))), chunk)
            chunk_labels = None if label_arr is None else label_arr[at:at + chunk.real]
            acc.update(ref, test, chunk.real, chunk_labels, token_mask(chunk.feeds, chunk.real))
            del ref, test
        seen += n
    if seen == 0:
        raise DataError("evaluation data is empty: no batches to compare; pass at least one sample")
    if label_arr is not None and not isinstance(data, DataSource) and seen != len(label_arr):
        raise DataError(f"{len(label_arr)} labels but {seen} samples; give one label per sample")
    rows = data.rows_per_sample if isinstance(data, DataSource) else 1  # files of whole inputs: a sample is `rows`
    return CompareReport(seen // rows, acc.outputs(), acc.layer_metrics(), [p.reference for p in skipped], level,
                         tuple(providers))
