"""What the CPU is: its name and the instruction sets ONNX Runtime's kernels depend on, for every figure's record."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_vector_isa() -> str | None:
    """The widest x86 vector extension the CPU has (ONNX Runtime picks its kernels and channel blocking by it)."""
    return next((isa for isa in ("avx512f", "avx2", "avx", "sse4_2") if isa in _cpu_flags()), None)


def cpu_int8_dot_product() -> str | None:
    """The CPU's int8 dot-product instruction, which decides how much faster INT8 runs than FP32 on it: AMX, VNNI
    (AVX-512 or AVX), or Arm's dot product; None without one (x86 int8 kernels then add pairs of products in int16)."""
    found = ("amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "asimddp")
    return next((isa for isa in found if isa in _cpu_flags()), None)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next(line for line in info if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


ONNXRUNTIME_CHANNEL_BLOCKS = {"avx512f": 16, "avx2": 8}  # MLAS's NCHWc block on each x86 vector extension


def onnxruntime_channel_block() -> int | None:
    """How many channels ONNX Runtime's blocked (NCHWc) convolutions take at once on this CPU: widths that are not a
    multiple cost layout conversions, so it is the `--round-to` for a model that runs here. None where it has none."""
    return ONNXRUNTIME_CHANNEL_BLOCKS.get(cpu_vector_isa())
