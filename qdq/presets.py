"""Named configs for the CLI's ``--preset`` and ``qdq.quantize(config="int8")``.

| preset               | weights                                   | activations                           |
|----------------------|-------------------------------------------|---------------------------------------|
| `int8` (default)     | int8 per-channel symmetric, `static`; SmoothQuant (alpha 0.7) on LayerNorm-fed MatMul/Gemm | int8 per-tensor, `moving_average` |
| `int8-global-minmax` | as `int8` (SmoothQuant included)          | int8 per-tensor, `global_minmax`      |
| `int8-asymmetric`    | as `int8` (SmoothQuant included)          | int8 per-tensor asymmetric, `global_minmax` (onnxruntime's U8S8 grid) |
| `int8-smoothquant`   | as `int8`, SmoothQuant (alpha 0.8) on every activation read by a MatMul/Gemm (GELU outputs, attention context: a float Mul where it cannot fold) | as `int8` |
| `int8-gptq`          | as `int8`, rounded by GPTQ (Hessian error compensation + bias correction) | as `int8`  |
| `fp8`                | float8_e4m3fn per-channel, `static`       | float8_e4m3fn per-tensor, `global_minmax` |
| `w8`                 | int8 per-channel symmetric, `static`      | float (weight-only)                   |
| `w4`                 | int4 per-block (block 32), `static`       | float (weight-only)                   |
| `w4-gptq`            | int4 per-block (block 32) asymmetric, rounded by GPTQ | float (weight-only)       |

The `-gptq` presets need calibration data (GPTQ reads each layer's inputs); on EfficientNet-Lite0 `w4-gptq`
keeps top-1 at 89.3 % (FP32 90.2, `w4` 75.4), on all-MiniLM-L6-v2 cosine 0.988 (`w4` 0.956).

Activations after Relu/Relu6/Sigmoid are asymmetric (coreai_opt's known-range rule). Every
preset leaves graph outputs float where the producer allows (``float_graph_outputs``: the logits Gemm
returns float from onnxruntime's integer kernel) and turns on ``bias_correction`` (the calibration data's input means undo the bias that
weight rounding adds: on EfficientNet-Lite0, W8A8 logits SQNR 18.0 -> 22.5 dB, agreement with
FP32 95.9 % -> 98.0 %); ``QuantizerConfig()`` itself keeps coreai_opt's plain semantics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from qdq.config import ModuleQuantizerConfig, QuantizerConfig
from qdq.errors import ConfigError
from qdq.spec import PerBlockGranularity, PerChannelGranularity, QuantizationSpec

__all__ = ["PRESETS", "preset"]


def _w8a8(calculator: str, qscheme: str = "symmetric") -> QuantizerConfig:
    act = QuantizationSpec(dtype="int8", qparam_calculator_cls=calculator, qscheme=qscheme)
    return QuantizerConfig(global_config=ModuleQuantizerConfig(op_input_spec={"*": act}, op_output_spec={"*": act}),
                           algorithms=[{"name": "smoothquant"}])


def _fp8() -> QuantizerConfig:
    weight = QuantizationSpec(dtype="float8_e4m3fn", granularity=PerChannelGranularity())
    act = QuantizationSpec(dtype="float8_e4m3fn", qparam_calculator_cls="global_minmax")
    return QuantizerConfig(global_config=ModuleQuantizerConfig(
        op_state_spec={"weight": weight}, op_input_spec={"*": act}, op_output_spec={"*": act}))


def _weight_only(weight: QuantizationSpec) -> QuantizerConfig:
    return QuantizerConfig(global_config=ModuleQuantizerConfig(
        op_state_spec={"weight": weight}, op_input_spec=None, op_output_spec=None))


PRESETS: dict[str, Callable[[], QuantizerConfig]] = {
    # the seed's default, plus SmoothQuant where LayerNorm outputs feed MatMuls (transformers; a no-op on CNNs)
    "int8": lambda: dataclasses.replace(QuantizerConfig(), algorithms=[{"name": "smoothquant"}]),
    "int8-global-minmax": lambda: _w8a8("global_minmax"),
    "int8-asymmetric": lambda: _w8a8("global_minmax", "asymmetric"),
    # transformers, accuracy first: every MatMul/Gemm input smoothed (GELU outputs and attention context too)
    "int8-smoothquant": lambda: dataclasses.replace(QuantizerConfig(), algorithms=[
        {"name": "smoothquant", "alpha": 0.8, "targets": "all"}]),
    "int8-gptq": lambda: dataclasses.replace(QuantizerConfig(), algorithms=[{"name": "smoothquant"}, {"name": "gptq"}]),
    "fp8": _fp8,
    "w8": lambda: _weight_only(QuantizationSpec(dtype="int8", granularity=PerChannelGranularity())),
    "w4": lambda: _weight_only(QuantizationSpec(dtype="int4", granularity=PerBlockGranularity(block_size=32))),
    "w4-gptq": lambda: dataclasses.replace(_weight_only(QuantizationSpec(
        dtype="int4", qscheme="asymmetric", granularity=PerBlockGranularity(block_size=32))),
        algorithms=[{"name": "gptq"}]),
}


def preset(name: str) -> QuantizerConfig:
    """The config of a named preset."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}") from None
    return dataclasses.replace(factory(), bias_correction=True, float_graph_outputs=True)
