"""qdq.qat: the torch mirror of the ONNX quantizer, for quantization-aware training.

One :class:`~qdq.config.QuantizerConfig` drives both sides: :class:`QATQuantizer` builds a
trainable ``nn.Module`` from the prepared QDQ ONNX graph (fake-quant exactly where the ONNX side
puts QDQ, BatchNorm folded the same way), trains it with ordinary PyTorch loops and exports the
trained weights and qparams back into that QDQ graph.
"""

from qdq.qat.fake_quant import FakeQuantize, fake_quantize, quantize_codes
from qdq.qat.onnx_module import FakeQuantSite, OnnxModule
from qdq.qat.quantizer import QATQuantizer, read_qparams
from qdq.qat.schedule import QATSchedule
from qdq.qat.torch_ops import register_op, supported_ops

__all__ = [
    "FakeQuantSite",
    "FakeQuantize",
    "OnnxModule",
    "QATQuantizer",
    "QATSchedule",
    "fake_quantize",
    "quantize_codes",
    "read_qparams",
    "register_op",
    "supported_ops",
]
