"""qdq export --hf: a local Hugging Face transformer to ONNX with named int64 inputs and dynamic batch/sequence,
then quantized from a .txt of sentences (the transformer path end to end, offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from qdq.cli import main
from qdq.errors import ConfigError
from qdq.hf_export import resolve_hf_folder
from qdq.session import make_session

WORDS = ["[PAD]", "[UNK]", "the", "a", "model", "keeps", "its", "meaning", "every", "sentence", "quantized", "text"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def test_export_quantize_compare(hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny.onnx"
    assert main(["export", "--hf", str(hf_folder), "--pooling", "mean", "-o", str(out), "--quiet"]) == 0
    session = make_session(out)
    inputs = [i.name for i in session.get_inputs()]  # the tokenizer's outputs, in the exporter's order
    assert inputs[:2] == ["input_ids", "attention_mask"] and set(inputs) <= {"input_ids", "attention_mask",
                                                                               "token_type_ids"}
    assert {i.type for i in session.get_inputs()} == {"tensor(int64)"}
    assert all(i.shape == ["batch", "sequence"] for i in session.get_inputs())
    assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]
    rng = np.random.default_rng(0)
    for batch, seq in ((3, 7), (5, 12)):  # dynamic batch and sequence
        ids = rng.integers(2, len(WORDS), (batch, seq)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feeds = {k: v for k, v in feeds.items() if k in inputs}
        (emb,) = session.run(None, feeds)
        assert emb.shape == (batch, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(" ".join(rng.choice(WORDS[2:], 6)) for _ in range(48)), encoding="utf-8")
    quant = tmp_path / "q.onnx"
    common = ["--tokenizer", str(hf_folder), "--seq-len", "8", "--quiet"]
    assert main(["quantize", str(out), "-o", str(quant), "--calib-data", str(sentences),
                 "--preset", "int8-smoothquant", *common]) == 0
    capsys.readouterr()
    assert main(["compare", str(out), str(quant), "--data", str(sentences), *common]) == 0
    text = capsys.readouterr().out
    cosine = float(text.split("sentence_embedding")[1].split()[1])
    assert cosine > 0.98 and "NN agree" in text


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a folder nor an installed package"):
        resolve_hf_folder("no_such_package_qdq")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_hf_folder(tmp_path)


@pytest.mark.parametrize("backend", ["coreai", "coreml"])
def test_transformer_converts_for_apple_backends(hf_folder: Path, tmp_path: Path, backend: str) -> None:
    """BERT's shape arithmetic (position ids and mask broadcasts from Shape of the inputs) cannot be traced with a
    dynamic batch; the lowering folds it at static shapes and converts. Core AI's runtime then matches FP32."""
    import importlib.util

    import qdq

    if importlib.util.find_spec({"coreai": "coreai_torch", "coreml": "coremltools"}[backend]) is None:
        pytest.skip(f"the {backend} extra is not installed")
    fp32 = tmp_path / "tiny.onnx"
    assert main(["export", "--hf", str(hf_folder), "--pooling", "mean", "-o", str(fp32), "--quiet"]) == 0
    names = [i.name for i in make_session(fp32).get_inputs()]
    rng = np.random.default_rng(0)
    ids = rng.integers(2, len(WORDS), (16, 8)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feeds = {k: v for k, v in feeds.items() if k in names}
    batches = [{k: v[i:i + 4] for k, v in feeds.items()} for i in range(0, 16, 4)]
    final = qdq.quantize(fp32, "int8", batches, backend=backend, progress=False)
    out = qdq.save(final, tmp_path / ("m.aimodel" if backend == "coreai" else "m.mlpackage"))
    info = qdq.backends.artifact.backend_module(backend).inspect(out)
    assert info["float_weights"] == [] and sum(info["weight_dtypes"].values()) >= 12  # 2 layers x 6 MatMuls
    if backend == "coreai":
        from qdq.backends.coreai import CoreAIRuntime

        batch = {k: v[:2] for k, v in feeds.items()}  # the traced (static) shape
        with CoreAIRuntime(out) as rt:
            got = rt.run(batch)[0]
        ref = make_session(fp32).run(None, batch)[0]
        cos = np.sum(got * ref, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert got.shape == ref.shape and cos.min() > 0.98, cos
