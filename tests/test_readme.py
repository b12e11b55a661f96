"""The README's Python snippets run as written, on the digits CNN.

Each ```python block is executed in order in one namespace, in a scratch folder. The names the
README leaves to the reader (a trained torch model, its example input, calibration batches, a
training loop's pieces) come from a small preamble per block, built from models/digits.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_readme_has_python_blocks() -> None:
    blocks = _blocks()
    assert len(blocks) >= 2, "the README lost its Python API / QAT snippets"
    assert "..." not in blocks[0].replace("# ...", ""), "a placeholder in the Python API snippet cannot run"


def _api_preamble(ns: dict, digits_data) -> None:
    """Names the Python API snippet uses: torch_model, example, example_inputs, calibration_batches, x, calib.npy."""
    import torch

    from models.digits import trained_digits_cnn

    x_tr, _, x_te, _ = digits_data
    model, _ = trained_digits_cnn()
    np.save("calib.npy", x_tr[:64])
    ns.update(torch_model=model, example=torch.from_numpy(x_tr[:2]), example_inputs=x_tr[:2],
              calibration_batches=[x_tr[i:i + 32] for i in range(0, 128, 32)], x=x_te[:16])


def _qat_preamble(ns: dict, digits_data) -> None:
    """Names the QAT snippet uses: a two-batch train_loader, loss_fn, opt, the ONNX-side quantizer."""
    import torch

    x_tr, y_tr, _, _ = digits_data
    ns.update(example_inputs=(torch.from_numpy(x_tr[:2]),),
              calibration_batches=[torch.from_numpy(x_tr[i:i + 32]) for i in range(0, 64, 32)],
              train_loader=[(torch.from_numpy(x_tr[i:i + 32]), torch.from_numpy(y_tr[i:i + 32]).long())
                            for i in range(0, 64, 32)],
              loss_fn=torch.nn.functional.cross_entropy, onnx_quantizer=ns["quantizer"])
    # the snippet builds the optimizer over qmodel's parameters after prepare(): provide it lazily
    ns["opt"] = _LazySGD(ns)


class _LazySGD:
    """An SGD over ``qmodel``'s parameters, created on first use (the snippet makes qmodel itself)."""

    def __init__(self, ns: dict) -> None:
        self.ns = ns
        self.opt = None

    def _get(self):
        import torch

        if self.opt is None:
            self.opt = torch.optim.SGD(self.ns["qmodel"].parameters(), lr=1e-3)
        return self.opt

    def step(self) -> None:
        self._get().step()

    def zero_grad(self) -> None:
        self._get().zero_grad()


def test_readme_python_snippets_run(tmp_path, monkeypatch, digits_data) -> None:
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    ns: dict = {"__name__": "readme"}
    _api_preamble(ns, digits_data)
    exec(compile(blocks[0], "README.md (Python API)", "exec"), ns)  # noqa: S102 - the README is ours
    final = ns["final"]
    assert any(n.op_type == "DequantizeLinear" for n in final.graph)
    assert Path("model.int8.onnx").is_file()
    logits = ns["logits"]
    assert logits.shape == (16, 10) and np.isfinite(logits).all()
    for i, block in enumerate(blocks[1:], start=1):
        if "QATQuantizer" in block:
            _qat_preamble(ns, digits_data)
        exec(compile(block, f"README.md (python block {i + 1})", "exec"), ns)  # noqa: S102
    assert Path("model.qdq.onnx").is_file()
