"""What the CPU running qdq means for onnxruntime's 8-bit kernels: does its U8S8 path saturate?

onnxruntime's x86 U8S8 GEMM/Conv kernels (uint8 activations x int8 weights) multiply with ``VPMADDUBSW``
unless the CPU has VNNI (AVX512-VNNI, AVX-VNNI) or AMX: that instruction adds two ``u8 x s8`` products into a
*saturating* int16, so ``a0*w0 + a1*w1`` beyond 32767 is clipped (onnxruntime's quantization docs: "might
suffer from saturation issues"). With the uint8 activations of an int8-symmetric model (zero point 128, values
around 128) and full-range int8 weights it clips often: EfficientNet-Lite0 int8 measures 8 dB logits SQNR on
an AVX2-only AMD EPYC instead of 23.4 dB. Its U8U8 kernels widen to int16 first and never saturate; with the
weights stored as uint8 (code + 128, zero point + 128) every dequantized value is the same.

:func:`u8s8_saturates` answers for this machine (Linux ``/proc/cpuinfo`` flags; macOS ``sysctl``); a CPU it
cannot read counts as saturating when it is x86 (the safe answer) and as not saturating otherwise (ARM's
``SDOT`` kernels are exact).
"""

from __future__ import annotations

import functools
import platform
import subprocess

from qdq.backends.capabilities import ExportBackend
from qdq.errors import ConfigError

__all__ = ["KERNEL_FORMATS", "kernel_format_for", "resolve_kernel_format", "u8s8_saturates"]

KERNEL_FORMATS = ("auto", "u8s8", "u8u8")

_EXACT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni", "avxvnni", "amx-int8"})


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _cpu_flags() -> set[str] | None:
    """Lower-case feature flags of this CPU, or None when they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].lower().split())
    except OSError:
        pass
    try:  # macOS on Intel
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                             capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.lower().split()) or None


@functools.cache
def u8s8_saturates() -> bool:
    """True when onnxruntime's U8S8 kernels on this machine add products in saturating int16 (x86 without VNNI/AMX)."""
    if not _x86():
        return False
    flags = _cpu_flags()
    return flags is None or not (flags & _EXACT_FLAGS)


def _checked(kernel_format: str | None) -> str:
    fmt = "auto" if kernel_format is None else str(kernel_format).lower()
    if fmt not in KERNEL_FORMATS:
        raise ConfigError(f"kernel_format must be one of {', '.join(KERNEL_FORMATS)}, got {kernel_format!r}")
    return fmt


def resolve_kernel_format(kernel_format: str | None) -> str:
    """``"u8s8"`` or ``"u8u8"`` for ``kernel_format`` (``None``/``"auto"``: u8u8 where U8S8 saturates on this CPU)."""
    fmt = _checked(kernel_format)
    if fmt == "auto":
        return "u8u8" if u8s8_saturates() else "u8s8"
    return fmt


def kernel_format_for(backend: ExportBackend, kernel_format: str | None) -> str | None:
    """The resolved format onnxruntime's finalize uses, None for the other backends; a bad name, or a format
    asked of another backend, is one ConfigError line."""
    if backend is ExportBackend.ONNXRuntime:
        return resolve_kernel_format(kernel_format)
    if _checked(kernel_format) != "auto":
        raise ConfigError(f"kernel_format (--kernel-format) is an onnxruntime option, not one of {backend.value}")
    return None
