"""The report as a page: HTML (figures embedded as base64 PNG, inline CSS, no network) or Markdown tables."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from qdq.metrics import expected_text

if TYPE_CHECKING:
    from qdq.report import LayerRow, Report
    from qdq.report.layers import ActivationStats

__all__ = ["render_html", "render_markdown"]

_THUMBNAILS = 6

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#1d1d1f;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}th{background:#f4f4f6}
td.l,th.l{text-align:left;font-family:ui-monospace,Menlo,Consolas,monospace}
tr.bad td{background:#fff1f0}.note{color:#666;font-size:.9em}
.thumbs{display:flex;flex-wrap:wrap;gap:1em}.thumbs figure{margin:0}.thumbs figcaption{font-size:.8em;
font-family:ui-monospace,monospace;max-width:260px;word-break:break-all}
"""


def _db(x: float) -> str:
    if x == math.inf:
        return "inf"
    if x == -math.inf:
        return "-inf"
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _output_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    exact = any(o.exact_match is not None for o in report.outputs)
    head = ["output", "SQNR dB", "cosine", "top-1 agreement", "expected agreement (90 % range)", "NN agreement",
            "FP32 accuracy", "quant accuracy", "max |diff|"] + (["elements equal"] if exact else [])
    rows = [[o.name, _db(o.sqnr_db), "-" if o.cosine is None else f"{o.cosine:.4f}", _pct(o.top1_agreement),
             expected_text(o), _pct(o.neighbour_agreement), _pct(o.fp32_accuracy), _pct(o.quant_accuracy),
             f"{o.max_abs_diff:.4g}"] + ([_pct(o.exact_match)] if exact else [])
            for o in report.outputs]
    return head, rows


def _layer_cells(i: int, r: LayerRow) -> list[str]:
    return [str(i), r.name, r.op_type, _db(r.isolated_db), _db(r.accumulated_db), _ms(r.quant_ms), _ms(r.fp32_ms)]


_LAYER_HEAD = ["#", "op name", "op type", "isolated SQNR dB", "accumulated SQNR dB", "quantized ms", "FP32 ms"]
_ACT_HEAD = ["tensor", "dtype", "scale", "zero point", "range", "observed", "clipped", "quantization SQNR dB"]


def _act_cells(a: ActivationStats) -> list[str]:
    observed = "-" if a.count == 0 else f"[{a.minimum:.4g}, {a.maximum:.4g}]"
    return [a.tensor, a.dtype, f"{a.scale:.4g}", str(a.zero_point), f"[{a.lo:.4g}, {a.hi:.4g}]", observed,
            f"{100 * a.clip_ratio:.3f} %", _db(a.sqnr_db)]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values: list[float], cap: float) -> np.ndarray:
    a = np.asarray(values, np.float64)
    return np.where(np.isfinite(a), a, cap)


def _layer_plot(report: Report) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.layers
    x = np.arange(len(rows))
    iso = [r.isolated_db for r in rows]
    acc = [r.accumulated_db for r in rows]
    finite = [v for v in iso + acc if math.isfinite(v)]
    cap = (max(finite) + 5) if finite else 100.0
    fig, ax = plt.subplots(figsize=(min(18, 4 + 0.18 * len(rows)), 4.2))
    ax.plot(x, _finite(iso, cap), "o-", ms=3.5, lw=1, label="isolated (only this layer quantized)")
    ax.plot(x, _finite(acc, cap), "s-", ms=3, lw=1, label="accumulated (whole model quantized)")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("SQNR vs FP32 (dB)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if len(rows) <= 60:
        ax.set_xticks(x)
        ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    ax.set_title("per-layer error: isolated vs accumulated")
    return _png(fig)


def _histogram(a: ActivationStats) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = a.edges
    fig, ax = plt.subplots(figsize=(2.8, 1.7))
    ax.bar(edges[:-1], a.hist[1:-1], width=np.diff(edges), align="edge", color="#4a7bd0")
    ax.axvline(a.lo, color="#d04a4a", lw=1)
    ax.axvline(a.hi, color="#d04a4a", lw=1)
    ax.set_yscale("log")
    ax.tick_params(labelsize=6)
    if a.hist[0] or a.hist[-1]:
        ax.set_title(f"{a.hist[0] + a.hist[-1]} values beyond the plot", fontsize=6)
    return _png(fig)


def _table(head: list[str], rows: list[list[str]], *, left: int = 1, bad: set[int] | None = None) -> str:
    ths = "".join(f'<th class="l">{html.escape(h)}</th>' if i < left else f"<th>{html.escape(h)}</th>"
                  for i, h in enumerate(head))
    out = [f"<table><thead><tr>{ths}</tr></thead><tbody>"]
    for k, row in enumerate(rows):
        cls = ' class="bad"' if bad and k in bad else ""
        tds = "".join(f'<td class="l">{html.escape(c)}</td>' if i < left else f"<td>{html.escape(c)}</td>"
                      for i, c in enumerate(row))
        out.append(f"<tr{cls}>{tds}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(report: Report) -> str:
    worst = {id(r) for r in report.worst_layers(max(1, min(5, len(report.layers) // 5)))}
    layer_rows = [_layer_cells(i, r) for i, r in enumerate(report.layers)]
    bad = {i for i, r in enumerate(report.layers) if id(r) in worst}
    acts = sorted(report.activations, key=lambda a: a.sqnr_db)
    thumbs = "".join(f'<figure><img alt="histogram of {html.escape(a.tensor)}" src="{_histogram(a)}">'
                     f"<figcaption>{html.escape(a.tensor)}: {_db(a.sqnr_db)} dB, clipped "
                     f"{100 * a.clip_ratio:.3f} %</figcaption></figure>" for a in acts[:_THUMBNAILS] if a.count)
    head, out_rows = _output_rows(report)
    quant_total = sum(r.quant_ms or 0.0 for r in report.layers)
    fp_total = sum(r.fp32_ms or 0.0 for r in report.layers)
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>qdq report: {html.escape(report.quant_model)}</title><style>{_CSS}</style></head><body>",
        "<h1>qdq quantization report</h1>",
        (f'<p class="note">FP32 <code>{html.escape(report.fp32_model)}</code> vs quantized '
        f"<code>{html.escape(report.quant_model)}</code>, {report.num_samples} samples, onnxruntime CPU, "
        f"{html.escape(report.created)}.</p>"),
        "<h2>Model outputs</h2>", _table(head, out_rows),
        "<h2>Per-layer error</h2>",
        ('<p class="note">Isolated: the layer alone quantized (its inputs re-quantized from the FP32 tensors with '
        "its own qparams, weights as stored) against the FP32 layer. Accumulated: the quantized model's tensor "
        "(every earlier layer quantized too). Names are node names and op types as <code>op_name_configs</code> / "
        "<code>op_type_configs</code> use them; the worst isolated layers are highlighted. Times: "
        "onnxruntime's profiler, optimized graphs, one thread, the first batch (fused kernels matched by name; "
        f"matched totals {quant_total:.2f} ms quantized, {fp_total:.2f} ms FP32).</p>"),
        f'<img id="layer-plot" alt="per-layer SQNR plot" src="{_layer_plot(report)}">',
        f'<div id="layer-table">{_table(_LAYER_HEAD, layer_rows, left=3, bad=bad)}</div>',
    ]
    if report.skipped:
        parts.append(f'<p class="note">Not isolated: {html.escape(", ".join(report.skipped))}</p>')
    parts += [
        "<h2>Quantized activations</h2>",
        ('<p class="note">Per-tensor qparams of every quantized activation, worst quantization SQNR first; '
        "clipped: FP32 values beyond the representable range by more than half a step. Histograms (log counts, "
        "representable range in red) of the worst.</p>"),
        f'<div class="thumbs">{thumbs}</div>',
        _table(_ACT_HEAD, [_act_cells(a) for a in acts]),
        # records that the embedded plot decoded (its pixel width) on the body: a browser check reads it
        ("<script>window.addEventListener('load',function(){var p=document.getElementById('layer-plot');"
        "document.body.setAttribute('data-plot-width',String(p.naturalWidth));});</script>"),
        "</body></html>",
    ]
    return "\n".join(parts)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    head, out_rows = _output_rows(report)
    acts = sorted(report.activations, key=lambda a: a.sqnr_db)
    parts = [
        "# qdq quantization report", "",
        (f"FP32 `{report.fp32_model}` vs quantized `{report.quant_model}`, {report.num_samples} samples, "
        f"onnxruntime CPU, {report.created}."), "",
        "## Model outputs", "", _md_table(head, out_rows), "",
        "## Per-layer error (isolated: only this layer quantized; accumulated: the whole model)", "",
        _md_table(_LAYER_HEAD, [_layer_cells(i, r) for i, r in enumerate(report.layers)]), "",
    ]
    if report.skipped:
        parts += [f"Not isolated: {', '.join(report.skipped)}", ""]
    parts += ["## Quantized activations (worst first)", "", _md_table(_ACT_HEAD, [_act_cells(a) for a in acts]), ""]
    return "\n".join(parts)
