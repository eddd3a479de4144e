"""Shared helpers of the benchmark scripts: interleaved timing, peak memory in a fresh process, tables.

Timings are medians over rounds in which every case runs once, in turn, so load from other
processes hits all cases of a table alike; ratios within one table are the numbers to trust.
The block benchmarks evict the CPU caches before every timed call (`CacheEviction`, as
triton.testing.do_bench clears a GPU's L2): a memory-bound case then reads its inputs from main
memory, whatever the case before it left in a last-level cache that holds whole activations.
By default the glibc allocator is told to keep freed memory (`retain_freed_memory`): otherwise
every buffer over its mmap threshold comes back from the kernel as fresh pages on each call, and
page faults (zeroing 25-100 MB per buffer) decide the timings, in an order-dependent way (a case
pays for the memory the case before it returned). PyTorch's GPU caching allocator, and jemalloc or
tcmalloc on CPU, behave like the retained heap; `--system-allocator` measures glibc's default.
Peak memory is the growth of the resident set (VmHWM after clearing it) while one case runs once,
in a fresh interpreter per case, so no cached allocation of an earlier case hides it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gcnet._machine import last_level_cache_bytes, retain_freed_memory


def load() -> str:
    """The 1/5/15-minute load averages, e.g. '0.52 0.61 0.40'."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system-allocator", action="store_true",
        help="keep glibc's default malloc (freed buffers go back to the OS; page faults in timings)",
    )


def configure_allocator(system: bool) -> str:
    """Apply the allocator choice; return how to name it in the results."""
    if system:
        return "glibc default"
    return "glibc, freed memory retained" if retain_freed_memory() else "system default (not glibc)"


def start_run(threads: int, system_allocator: bool, **details: str) -> dict[str, str]:
    """Set threads, seed and allocator for a benchmark run; print and return its environment."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    info = {**environment(), "allocator": configure_allocator(system_allocator), **details}
    print(" | ".join(f"{k}: {v}" for k, v in info.items()), f"| load: {load()}\n", flush=True)
    return info


def write_json(path: str, environment: dict[str, str], **payload: object) -> None:
    """Write a run's environment and results to `path` (atomically: an interrupted run leaves the old file)."""
    from gcnet.engine.checkpoint import atomic_write

    text = json.dumps({"environment": environment, **payload}, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def environment() -> dict[str, str]:
    """Machine and versions, for the header of a result."""
    from gcnet._machine import cpu_caches, cpu_isa, cpu_model

    info = {
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "isa": cpu_isa(),
        "caches": cpu_caches(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }
    from gcnet.blocks import _fused, native_kernels_available

    built_for = getattr(_fused._native, "built_for", None)  # absent in an older gcnet (compare)
    built = "built" + (f" for {built_for}" if built_for else "")
    info["gcnet CPU kernels"] = built if native_kernels_available() else "not built (PyTorch paths)"
    describe = getattr(_fused, "describe_onednn_products", None)  # absent in an older gcnet (compare)
    info["NL products"] = describe() if describe is not None else "not probed by this gcnet"
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = "not installed"
    return info


@dataclass
class Timing:
    """Seconds of each round for one case."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3


class CacheEviction:
    """Read a buffer larger than the last-level cache, so the next call starts cold.

    Reads, not writes: a written buffer would leave the cache full of dirty lines, and the timed
    call would pay for writing them back (a fixed cost that shrinks every ratio).
    """

    def __init__(self, mib: int) -> None:
        self.mib = mib
        self.buffer = torch.zeros(mib * 2**20 // 4) if mib > 0 else None

    @staticmethod
    def mib_for_this_machine() -> int:
        """Twice the last-level cache (a cache is not perfectly LRU), at least 64 MiB."""
        return max(64, 2 * (last_level_cache_bytes() or 0) // 2**20)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.sum()


def interleaved(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    before_each: Callable[[], None] | None = None,
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, Timing]:
    """Run every case once per round, in turn; return the timings of the rounds after `warmup`.

    `before_each` runs, untimed, before every call (e.g. a `CacheEviction`); a case's entry in
    `setups` runs, untimed, before that (e.g. setting train or eval mode: not the case's cost).
    """
    timings = {name: Timing() for name in cases}
    for round_index in range(warmup + rounds):
        for name, run in cases.items():
            if setups and name in setups:
                setups[name]()
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                timings[name].seconds.append(elapsed)
    return timings


def cuda_synchronized(run: Callable[[], object]) -> Callable[[], None]:
    """`run` followed by a wait for the GPU, so that a timer around it sees the kernels finish."""

    def call() -> None:
        run()
        torch.cuda.synchronize()

    return call


def cuda_peak_growth_mib(run: Callable[[], object]) -> float:
    """MiB the CUDA allocator's high-water mark rose above the memory in use while `run` ran once."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def paired_ratios(case: Timing, base: Timing) -> list[float]:
    """case / base within each round: load that moves between rounds cancels in each ratio."""
    return [c / b for c, b in zip(case.seconds, base.seconds)]


def median_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """The median and a distribution-free ~95% interval for it (order statistics of a binomial)."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, int((n - 1.96 * n**0.5) / 2))  # 0-based rank of the lower bound
    return statistics.median(ordered), ordered[k], ordered[n - 1 - k]


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_growth_mib(run: Callable[[], object]) -> float:
    """Growth of the resident set's high-water mark (MiB) while `run` runs once, in this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    run()
    return (_rss_kib("VmHWM") - before) / 1024


def memory_in_subprocesses(module: str, specs: Sequence[str], workers: int = 2) -> dict[str, float | str]:
    """Run `python -m module --memory-case SPEC` for each spec (a few at once); peak MiB per spec.

    Memory does not depend on timing, so the fresh processes may run side by side.
    """
    results: dict[str, float | str] = {}
    pending = list(specs)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < workers:
            spec = pending.pop(0)
            command = [sys.executable, "-m", module, "--memory-case", spec]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((spec, process))
        spec, process = running.pop(0)
        out, err = process.communicate()
        if process.returncode != 0:
            results[spec] = "failed: " + (err.strip().splitlines() or ["?"])[-1][:80]
            continue
        results[spec] = float(json.loads(out.strip().splitlines()[-1])["peak_mib"])
    return results


def run_script(module: str, args: Sequence[str], caller: str, src: str | None = None) -> str:
    """The printed output of `python -m module args` in a fresh process from the repository root
    (with `src`'s gcnet ahead of any installed one); exits naming `caller` and the error if it fails."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (src, root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{caller}: {module} {' '.join(args)} failed ({src or 'this checkout'}):\n"
                         f"{done.stderr[-2000:]}")
    return done.stdout


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.1f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"
