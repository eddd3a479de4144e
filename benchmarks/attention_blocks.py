"""Time of the NL blockwise attention backward by row-block size, at several head dims.

    python -m benchmarks.attention_blocks            # 1 x 16384 positions (a 128x128 map), 3 rounds
    python -m benchmarks.attention_blocks --dims 16 32 64 --sizes 4194304 1048576 262144 --rounds 6
    python -m benchmarks.attention_blocks --quick    # a smoke run

`BlockwiseAttention` recomputes the softmax for (rows x keys) blocks in its backward; this compares
the rows chosen (`attention_block_rows`: from the L2 size and the head dim) with fixed block sizes,
interleaved. Sizes are in elements of one block matrix, rows x keys.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks._common import add_allocator_option, interleaved, markdown_table, start_run
from gcnet.blocks import _fused

SIZES = (1 << 22, 1 << 21, 1 << 20, 1 << 18)


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024 positions, 1 round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64], help="head dims (default 32 64)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="block sizes in elements, besides the chosen one (default 4M 2M 1M 256K)")
    parser.add_argument("--rounds", type=int, default=3)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    start_run(args.threads, args.system_allocator)
    positions, rounds = (1024, 1) if args.quick else (16384, args.rounds)
    original = _fused.attention_block_rows
    rows = []
    for dim in args.dims:
        q, k, v = (torch.randn(1, positions, dim, requires_grad=True) for _ in range(3))
        out = _fused.BlockwiseAttention.apply(q, k, v, dim**-0.5)
        grad = torch.randn_like(out)
        chosen = original(positions, positions, dim, out.element_size()) * positions

        def backward(elements: int):
            def run() -> object:
                _fused.attention_block_rows = lambda *shape: max(1, elements // positions)
                return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
            return run

        cases = {f"{size}": backward(size) for size in sorted({*args.sizes, chosen}, reverse=True)}
        try:
            timings = interleaved(cases, rounds, warmup=1)
        finally:
            _fused.attention_block_rows = original
        rows += [[dim, f"{name}{' (chosen)' if int(name) == chosen else ''}", f"{t.median_ms:.1f}"]
                 for name, t in timings.items()]
    print(markdown_table(["head dim", "block elements", "backward ms"], rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
