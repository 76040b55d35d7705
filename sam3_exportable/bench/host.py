"""What the bench records about the machine it runs on, and whether bf16 is native there.

Hosts of the same machine kind differ from one run to the next (one had AVX-512 with bf16
instructions, another AVX2 only, where bf16 matmuls run about 10x slower than fp32), so
every results file says which one it ran on and each target says which hosts it applies to.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["BF16_FLAGS", "RECORDED_FLAGS", "bf16_native", "capability_line", "cpu_flags", "machine_info"]

#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic; ``avx512_vnni`` is recorded too.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: Flags recorded in every results file.
RECORDED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_native(flags: set[str] | None = None) -> bool:
    """True when the CPU has bf16 instructions (avx512_bf16 or AMX): bf16 targets apply."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch's CPU capability, the bf16-relevant flags and the
    allocator environment: what every figure of a run depends on."""
    flags = cpu_flags()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": {flag: flag in flags for flag in RECORDED_FLAGS},
        "bf16_native": bf16_native(flags),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # malloc tuning from the environment applies to every job, under any --malloc policy
    info["malloc_env"] = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 2)
    except (OSError, ValueError):
        pass
    return info


def capability_line(machine: dict[str, Any]) -> str:
    """One line for reports: CPU, torch capability, bf16 flags, threads."""
    flags = machine.get("cpu_flags", {})
    shown = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni") if isinstance(flags, dict) and flags.get(f))
    native = "native bf16" if machine.get("bf16_native") else "bf16 emulated (no avx512_bf16/amx_bf16)"
    return (
        f"{machine.get('cpu_model', 'CPU')}, torch CPU capability {machine.get('torch_cpu_capability')}, "
        f"flags: {shown or 'none of avx512_bf16/amx_bf16/avx512_vnni'} ({native}), "
        f"{machine.get('cpu_count')} cores, {machine.get('torch_threads')} torch threads"
    )
