"""What machine a measurement ran on: CPU model, the ISA PyTorch's kernels use, cache sizes."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector ISA PyTorch's CPU kernels dispatch to here, e.g. "AVX2" or "AVX512"."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_caches() -> str:
    """Cache sizes of CPU 0 by level, e.g. "L1d 32K, L1i 32K, L2 512K, L3 32768K" ("unknown" off Linux)."""
    found = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        found.append(f"L{level}{suffix} {size}")
    return ", ".join(found) or "unknown"
