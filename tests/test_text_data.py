"""A .txt of sentences, tokenized with a local Hugging Face tokenizer folder, as calibration / evaluation data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qdq.data import open_data
from qdq.errors import DataError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny WordLevel fast tokenizer saved like a Hugging Face folder (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "the", "a", "quantized", "model", "keeps", "its", "meaning", "on", "every", "sentence"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return folder


def test_lines_become_padded_model_inputs(tmp_path: Path, tokenizer_dir: Path) -> None:
    text = tmp_path / "s.txt"
    text.write_text("the model keeps its meaning\n\n  a quantized sentence  \nunknown words here\n", encoding="utf-8")
    src = open_data(text, ["input_ids", "attention_mask"], tokenizer=tokenizer_dir, seq_len=6)
    assert len(src) == 3 and src.kind == "text"  # blank lines are not samples
    batches = list(src.batches(2))
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (1, 6)]
    ids = np.concatenate([b["input_ids"] for b in batches])
    mask = np.concatenate([b["attention_mask"] for b in batches])
    assert ids.dtype == np.int64 and mask.tolist()[0] == [1, 1, 1, 1, 1, 0] and mask.tolist()[2] == [1, 1, 1, 0, 0, 0]
    assert ids[0, :5].tolist() == [2, 5, 6, 7, 8]


def test_text_errors_name_the_fix(tmp_path: Path, tokenizer_dir: Path) -> None:
    text = tmp_path / "s.txt"
    text.write_text("the model\n", encoding="utf-8")
    with pytest.raises(DataError, match="pass --tokenizer PATH"):
        open_data(text, ["input_ids"])
    with pytest.raises(DataError, match="not a folder"):
        list(open_data(text, ["input_ids"], tokenizer=tmp_path / "nope").batches(1))
    with pytest.raises(DataError, match=r"the model also needs \['pixel_values'\]"):
        list(open_data(text, ["input_ids", "pixel_values"], tokenizer=tokenizer_dir).batches(1))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        open_data(bad, ["input_ids"], tokenizer=tokenizer_dir)
