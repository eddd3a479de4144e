"""Time of the attention pooling kernels by positions per block, against one pass over the same memory.

    python -m benchmarks.pool_blocks                 # the GC shapes of benchmarks.blocks, 9 rounds
    python -m benchmarks.pool_blocks --shape 32x256x56x56 --rounds 15
    python -m benchmarks.pool_blocks --quick         # a smoke run

The NCHW kernels read a block of positions of every channel row twice (`positions_per_block`),
x alone; the backward then writes grad_x from grad_out over whole rows. This times the blocks
the rule chooses against whole samples and blocks of about a quarter, a half and all of L2 (split
evenly over the sample), interleaved, with caches evicted before each call ("cold") or x just
read ("warm"). Each time is also given as a ratio to one pass over the same memory within its
round: x.sum for the forward, x + grad_out for the backward.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable

import torch

from benchmarks._common import (
    CacheEviction,
    add_allocator_option,
    interleaved,
    markdown_table,
    paired_ratios,
    ratio,
    start_run,
)
from benchmarks.blocks import GC_SHAPES, shape_name
from gcnet.blocks import _fused

ONE_PASS = "one pass"


def candidates(positions: torch.Tensor) -> dict[int, str]:
    """Positions per block to time, each with what it is: the rule's choices and L2 fractions."""
    _, C, N = positions.shape
    l2, _ = _fused._cache_bytes()
    row = C * positions.element_size()
    found: dict[int, list[str]] = {}
    for name, size in (("L2/4", l2 // 4), ("L2/2", l2 // 2), ("L2", l2)):
        blocks = math.ceil(N / max(1, size // row))
        found.setdefault(math.ceil(N / blocks), []).append(name)
    found.setdefault(N, []).append("whole samples")
    found.setdefault(_fused.positions_per_block(positions), []).append("the rule's")
    return {size: ", ".join(names) for size, names in sorted(found.items(), reverse=True)}


def timed_cases(
    shape: tuple[int, ...], backward: bool
) -> tuple[dict[str, Callable[[], object]], torch.Tensor]:
    """The one-pass reference and one kernel call per candidate block, and x (B, C, N)."""
    generator = torch.Generator().manual_seed(0)
    B, C = shape[:2]
    x = torch.randn(shape, generator=generator).flatten(2)  # (B, C, N)
    weight = torch.randn(1, C, generator=generator) * 0.05
    bias = torch.zeros(1)
    native = _fused._native
    if not backward:
        cases = {ONE_PASS: lambda: x.sum(-1)}
        for size, name in candidates(x).items():
            cases[f"{size} ({name})"] = lambda size=size: native.attention_pool(x, weight, bias, size)
        return cases, x
    grad = torch.randn(x.shape, generator=generator)
    alpha, context = native.attention_pool(x, weight, bias, x.shape[-1])
    grad_context = torch.randn(B, C, generator=generator)
    cases = {ONE_PASS: lambda: x + grad}
    for size, name in candidates(x).items():
        cases[f"{size} ({name})"] = lambda size=size: native.attention_pool_backward(
            x, grad, weight, alpha, context, grad_context, None, size
        )
    return cases, x


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", action="append", help="repeatable (default: benchmarks.blocks' GC shapes)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 round")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    start_run(args.threads, args.system_allocator)
    if not _fused.native_kernels_available():
        print("gcnet._C is not built: no kernels to time")
        return []
    if args.shape:
        shapes = [tuple(int(size) for size in name.split("x")) for name in args.shape]
    else:
        shapes = GC_SHAPES[args.quick]
    rounds = 1 if args.quick else args.rounds
    evict = CacheEviction(8 if args.quick else CacheEviction.mib_for_this_machine())
    rows = []
    for shape in shapes:
        for backward in (False, True):
            cases, x = timed_cases(shape, backward)
            modes = {"cold": evict, "warm": lambda: x.sum()}
            timings = {mode: interleaved(cases, rounds, 1, before) for mode, before in modes.items()}
            direction = "backward" if backward else "forward"
            reference = [f"{timings[mode][ONE_PASS].median_ms:.3g}" for mode in modes]
            rows.append([shape_name(shape), direction, "x + grad_out" if backward else "x.sum", "",
                         reference[0], "", reference[1], ""])
            for name in cases:
                if name == ONE_PASS:
                    continue
                cells = []
                for mode in modes:
                    timing = timings[mode][name]
                    within = statistics.median(paired_ratios(timing, timings[mode][ONE_PASS]))
                    cells += [f"{timing.median_ms:.3g}", ratio(within)]
                size = int(name.split()[0])
                row_bytes = size * x.element_size()
                rows.append([shape_name(shape), direction, name, row_bytes, *cells])
    header = ["shape", "kernel", "positions per block", "row bytes", "cold ms", "cold / one pass",
              "warm ms", "warm / one pass"]
    print(markdown_table(header, rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
