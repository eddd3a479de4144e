"""What machine a measurement ran on: CPU model, the ISA PyTorch's kernels use, cache sizes."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (/proc/cpuinfo), e.g. "AMD EPYC (family 26,
    model 2)": VMs often report a bare "AMD EPYC" for Zen 3 and Zen 5 alike. Elsewhere what `platform`
    knows."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the end of CPU 0
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = [f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model"))
               if key in fields]
    return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def cpu_isa() -> str:
    """The vector ISA PyTorch's CPU kernels dispatch to here, e.g. "AVX2" or "AVX512"."""
    return torch.backends.cpu.get_cpu_capability()


def cache_sizes() -> dict[str, int]:
    """Cache sizes of CPU 0 in bytes by level, e.g. {"L1d": 32768, "L1i": 32768, "L2": 524288, ...}.

    From sysfs; empty off Linux or where the machine does not report them.
    """
    found = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
            size = int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        found[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = size
    return found


def last_level_cache_bytes() -> int | None:
    """Size of CPU 0's last cache level in bytes, or None where it is not reported."""
    sizes = cache_sizes()
    return sizes[max(sizes, key=lambda name: name[:2])] if sizes else None


def cpu_caches() -> str:
    """Cache sizes of CPU 0 by level, e.g. "L1d 32K, L1i 32K, L2 512K, L3 32768K" ("unknown" off Linux)."""
    return ", ".join(f"{name} {size // 2**10}K" for name, size in cache_sizes().items()) or "unknown"


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process: no trimming, no mmap per large buffer.

    By default every tensor over glibc's mmap threshold is fresh pages from the kernel, zeroed on first
    touch, on each training step; keeping them makes those page faults go away (docs/benchmarks.md,
    "Allocator"). Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))


def preloaded_allocator() -> str | None:
    """"jemalloc" or "tcmalloc" when one replaces malloc in this process (LD_PRELOAD), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return None
