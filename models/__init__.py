"""Reference models for tests, examples and benchmarks (digits CNN, tiny MLP/attention, EfficientNet-Lite0).

Each module exposes a ``factory()`` returning ``(model, (example_input,))`` for ``qdq export --model``.
Submodules import torch lazily enough that ``import models`` itself stays cheap.
"""

__all__ = ["digits", "efficientnet", "tiny"]
