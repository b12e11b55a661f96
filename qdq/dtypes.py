"""Quantized data types: ranges, ONNX/numpy/torch equivalents, parsing."""

from __future__ import annotations

import enum
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qdq.errors import ConfigError

__all__ = ["QDType", "parse_dtype"]


class QDType(enum.Enum):
    """A quantized dtype. ``value`` is the canonical name used in configs and YAML."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"
    UINT16 = "uint16"
    INT4 = "int4"
    UINT4 = "uint4"
    FLOAT8_E4M3FN = "float8_e4m3fn"
    FLOAT8_E5M2 = "float8_e5m2"

    @property
    def is_float(self) -> bool:
        return self in (QDType.FLOAT8_E4M3FN, QDType.FLOAT8_E5M2)

    @property
    def is_signed(self) -> bool:
        return self.is_float or self.value.startswith("int")

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def qmin(self) -> float:
        """Smallest representable value (for float8: -largest finite)."""
        return _RANGE[self][0]

    @property
    def qmax(self) -> float:
        """Largest representable value (for float8: largest finite)."""
        return _RANGE[self][1]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_NP[self])

    @property
    def ir_dtype(self) -> ir.DataType:
        return _IR[self]

    @classmethod
    def from_ir(cls, dtype: ir.DataType) -> QDType:
        """The QDType stored as ``dtype`` (KeyError if none, e.g. int32)."""
        for member, ir_type in _IR.items():
            if ir_type == dtype:
                return member
        raise KeyError(dtype)

    @property
    def min_opset(self) -> int:
        """Lowest ai.onnx opset whose QuantizeLinear/DequantizeLinear accept this dtype."""
        return _OPSET[self]

    @property
    def torch_name(self) -> str:
        return self.value

    def __str__(self) -> str:
        return self.value


_BITS = {
    QDType.INT8: 8, QDType.UINT8: 8, QDType.INT16: 16, QDType.UINT16: 16,
    QDType.INT4: 4, QDType.UINT4: 4, QDType.FLOAT8_E4M3FN: 8, QDType.FLOAT8_E5M2: 8,
}
_RANGE = {
    QDType.INT8: (-128, 127), QDType.UINT8: (0, 255),
    QDType.INT16: (-32768, 32767), QDType.UINT16: (0, 65535),
    QDType.INT4: (-8, 7), QDType.UINT4: (0, 15),
    QDType.FLOAT8_E4M3FN: (-448.0, 448.0), QDType.FLOAT8_E5M2: (-57344.0, 57344.0),
}
_NP: dict[QDType, Any] = {
    QDType.INT8: np.int8, QDType.UINT8: np.uint8, QDType.INT16: np.int16,
    QDType.UINT16: np.uint16, QDType.INT4: ml_dtypes.int4, QDType.UINT4: ml_dtypes.uint4,
    QDType.FLOAT8_E4M3FN: ml_dtypes.float8_e4m3fn, QDType.FLOAT8_E5M2: ml_dtypes.float8_e5m2,
}
_IR = {
    QDType.INT8: ir.DataType.INT8, QDType.UINT8: ir.DataType.UINT8,
    QDType.INT16: ir.DataType.INT16, QDType.UINT16: ir.DataType.UINT16,
    QDType.INT4: ir.DataType.INT4, QDType.UINT4: ir.DataType.UINT4,
    QDType.FLOAT8_E4M3FN: ir.DataType.FLOAT8E4M3FN, QDType.FLOAT8_E5M2: ir.DataType.FLOAT8E5M2,
}
_OPSET = {
    QDType.INT8: 13, QDType.UINT8: 13, QDType.INT16: 21, QDType.UINT16: 21,
    QDType.INT4: 21, QDType.UINT4: 21, QDType.FLOAT8_E4M3FN: 19, QDType.FLOAT8_E5M2: 19,
}
_ALIASES = {
    "qint8": QDType.INT8, "quint8": QDType.UINT8, "fp8": QDType.FLOAT8_E4M3FN,
    "float8": QDType.FLOAT8_E4M3FN, "e4m3": QDType.FLOAT8_E4M3FN, "e5m2": QDType.FLOAT8_E5M2,
}


def parse_dtype(value: Any) -> QDType:
    """Accept a QDType, its name (``"int8"``), a torch dtype (``torch.int8``) or ``ml_dtypes``/numpy dtype."""
    if isinstance(value, QDType):
        return value
    valid = ", ".join(m.value for m in QDType)
    if isinstance(value, str):
        name = value
    elif isinstance(value, np.dtype):
        name = value.name
    elif isinstance(value, type) and issubclass(value, np.generic):  # np.int8, ml_dtypes.int4, ...
        name = np.dtype(value).name
    elif type(value).__module__ == "torch" and str(value).startswith("torch."):  # torch.int8
        name = str(value)
    else:
        text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"quantization dtype must be a name such as 'int8', got {text}; use one of: {valid}")
    name = name.strip().lower().removeprefix("torch.")
    for member in QDType:
        if member.value == name:
            return member
    if name in _ALIASES:
        return _ALIASES[name]
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ConfigError(f"unsupported quantization dtype {text}; use one of: {valid}")
