"""Time of the NL blockwise attention backward by block size, at several head dims.

    python -m benchmarks.attention_blocks            # 1 x 16384 positions (a 128x128 map), 3 rounds
    python -m benchmarks.attention_blocks --dims 16 32 64 --sizes 4194304 1048576 262144 --rounds 6
    python -m benchmarks.attention_blocks --batch 128 --positions 256 --dims 16 32   # CIFAR's 16x16 NL
    python -m benchmarks.attention_blocks --quick    # a smoke run

`BlockwiseAttention` recomputes the softmax for (samples x rows x keys) blocks in its backward;
this compares the block chosen (`attention_blocks`: from the L2 size and the head dim) with fixed
sizes, interleaved. A size is the elements of one block matrix: whole samples where they fit in
it, else one sample's band of rows.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks._common import add_allocator_option, interleaved, markdown_table, start_run
from gcnet.blocks import _fused

SIZES = (1 << 22, 1 << 21, 1 << 20, 1 << 18)


def block_of(size: int, batch: int, positions: int) -> tuple[int, int]:
    """(samples, rows) of a block of `size` elements, as `attention_blocks` shapes them."""
    if positions * positions <= size:
        return min(batch, size // (positions * positions)), positions
    return 1, max(1, size // positions)


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024 positions, 1 round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--positions", type=int, default=16384, help="queries = keys (default 16384)")
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64], help="head dims (default 32 64)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="block sizes in elements, besides the chosen one (default 4M 2M 1M 256K)")
    parser.add_argument("--rounds", type=int, default=3)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    start_run(args.threads, args.system_allocator)
    positions, rounds = (1024, 1) if args.quick else (args.positions, args.rounds)
    original = _fused.attention_blocks
    rows = []
    for dim in args.dims:
        q, k, v = (torch.randn(args.batch, positions, dim, requires_grad=True) for _ in range(3))
        out = _fused.BlockwiseAttention.apply(q, k, v, dim**-0.5)
        grad = torch.randn_like(out)
        samples, band = original(args.batch, positions, positions, dim, out.element_size())
        chosen = samples * band * positions

        def backward(block: tuple[int, int]):
            def run() -> object:
                _fused.attention_blocks = lambda *shape: block
                return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
            return run

        sizes = sorted({*(samples * band * positions for samples, band in
                          (block_of(s, args.batch, positions) for s in args.sizes)), chosen}, reverse=True)
        cases = {str(size): backward(block_of(size, args.batch, positions)) for size in sizes}
        try:
            timings = interleaved(cases, rounds, warmup=1)
        finally:
            _fused.attention_blocks = original
        for name, timing in timings.items():
            samples, band = block_of(int(name), args.batch, positions)
            mark = " (chosen)" if int(name) == chosen else ""
            rows.append([dim, f"{name}{mark}", f"{samples} x {band}", f"{timing.median_ms:.1f}"])
    print(f"batch {args.batch}, {positions} positions\n")
    print(markdown_table(["head dim", "block elements", "samples x rows", "backward ms"], rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
