"""Time of the NL blockwise attention backward by row-block size, at head dims 32 and 64.

    python -m benchmarks.attention_blocks            # 1 x 16384 positions (a 128x128 map), 3 rounds
    python -m benchmarks.attention_blocks --quick    # a smoke run

`BlockwiseAttention` recomputes the softmax for (rows x keys) blocks in its backward; this compares
the size chosen from the machine's L2 (`attention_block_elements`) with fixed sizes, interleaved.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks._common import add_allocator_option, interleaved, markdown_table, start_run
from gcnet.blocks import _fused

SIZES = (1 << 22, 1 << 20, 1 << 18)


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024 positions, 1 round")
    parser.add_argument("--threads", type=int, default=2)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    start_run(args.threads, args.system_allocator)
    positions, rounds = (1024, 1) if args.quick else (16384, 3)
    original = _fused.attention_block_elements
    chosen = original(4)
    rows = []
    for dim in (32, 64):
        q, k, v = (torch.randn(1, positions, dim, requires_grad=True) for _ in range(3))
        out = _fused.BlockwiseAttention.apply(q, k, v, dim**-0.5)
        grad = torch.randn_like(out)

        def backward(elements: int):
            def run() -> object:
                _fused.attention_block_elements = lambda element_size: elements
                return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
            return run

        cases = {f"{size}": backward(size) for size in sorted({*SIZES, chosen}, reverse=True)}
        try:
            timings = interleaved(cases, rounds, warmup=1)
        finally:
            _fused.attention_block_elements = original
        rows += [[dim, f"{name}{' (chosen)' if int(name) == chosen else ''}", f"{t.median_ms:.1f}"]
                 for name, t in timings.items()]
    print(markdown_table(["head dim", "block elements", "backward ms"], rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
