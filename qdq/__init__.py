"""qdq: ONNX-centric quantization toolkit."""
