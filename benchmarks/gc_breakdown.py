"""Where a GC r16 forward+backward spends its time: the CPU kernels inside the block, and alone.

    python -m benchmarks.gc_breakdown                          # 32x1024x14x14 and 32x256x56x56
    python -m benchmarks.gc_breakdown --shape 32x512x28x28 --steps 40

"in the block" times each kernel call of `gcnet._C` while the block runs forward+backward (after
the floor, as in `benchmarks.blocks --warm-cache`), summed per step; "alone" runs the same call on
the same buffers back to back, where its inputs stay in cache. A kernel much slower in the block
than alone waits on memory; the rest of a step (the add, grad_out's sum, autograd, and the
transforms' small graph where they do not run as kernels) is the step minus the kernels. Those
other parts are also timed alone, and the sum of every part alone is a lower bound on the step
with this design, printed as a ratio to the floor's forward (what the fwd+bwd target of
docs/benchmarks.md divides by). Then the transforms' forward (as the block runs it without
gradients) right after a pass over x and back to back (small ops pay for the pass), one pass
x + grad_out (what the pooling backward must at least take), and the block on 2 positions per
side, where x costs nothing: what does not scale with x, after a pass over x and with all caches
evicted (the benchmarks' default). Last, the step's kernels and ops called directly in order,
without autograd or the blocks' Python: the bound of this design, as a ratio to the floor's forward.
Rows timed back to back are means; rows timed after a pass or an eviction are medians.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks._common import (
    CacheEviction,
    add_allocator_option,
    interleaved,
    markdown_table,
    paired_ratios,
    start_run,
)
from benchmarks.blocks import randomize_, shape_name
from gcnet.blocks import GlobalContext, _fused

SHAPES = ("32x1024x14x14", "32x256x56x56")


class _Timed:
    """The kernels module with each call's time added to `totals`, and its arguments kept."""

    def __init__(self, module: object, totals: dict[str, float], calls: dict[str, tuple]) -> None:
        self._module, self._totals, self._calls = module, totals, calls

    def __getattr__(self, name: str) -> Callable:
        kernel = getattr(self._module, name)

        def timed(*args: object) -> object:
            start = time.perf_counter()
            result = kernel(*args)
            self._totals[name] += time.perf_counter() - start
            self._calls[name] = args
            return result

        return timed


def mean_ms(run: Callable[[], object], steps: int) -> float:
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps * 1e3


def breakdown(shape: tuple[int, ...], steps: int) -> list[list[object]]:
    block = randomize_(GlobalContext(shape[1], reduction=16)).train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).requires_grad_(True)
    grad = torch.randn(shape, generator=generator)
    totals: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, tuple] = {}
    parts: dict[str, float] = collections.defaultdict(float)

    def step() -> None:
        with torch.no_grad():
            start = time.perf_counter()
            x + x.sum(dim=(2, 3), keepdim=True)
            parts["floor forward"] += time.perf_counter() - start
        x.grad = None
        block.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = block(x)
        parts["block forward"] += time.perf_counter() - start
        start = time.perf_counter()
        out.backward(grad)
        parts["block backward"] += time.perf_counter() - start

    native = _fused._native
    _fused._native = _Timed(native, totals, calls)
    try:
        for _ in range(3):
            step()
        totals.clear()
        parts.clear()
        for _ in range(steps):
            step()
    finally:
        _fused._native = native
    rows = [[name, f"{seconds / steps * 1e3:.2f}", ""] for name, seconds in parts.items()]
    alone: dict[str, float] = {}
    for name, seconds in totals.items():
        args = calls[name]
        alone[name] = mean_ms(lambda: getattr(native, name)(*args), steps)
        rows.append([f"kernel {name}", f"{seconds / steps * 1e3:.2f}", f"{alone[name]:.2f}"])
    others = other_parts(block, x.detach(), grad, steps)
    if "transform_forward" in totals:  # the transforms ran as kernels: timed above
        del others["transforms (B, C), forward + backward"]
    alone.update(others)
    floor = alone.pop("floor forward")
    rows[0][2] = f"{floor:.2f}"
    rows += [[name, "", f"{ms:.2f}"] for name, ms in alone.items() if name not in totals]
    rows.append(["sum of the parts alone (lower bound)", "", f"{sum(alone.values()):.2f}"])
    rows.append(["  the same / floor forward alone", "", f"{sum(alone.values()) / floor:.2f}x"])
    after, back_to_back = transforms_forward_after_a_pass(block, x.detach(), steps)
    rows.append(["transforms forward, right after a sum over x", "", f"{after:.2f}"])
    rows.append(["transforms forward, back to back", "", f"{back_to_back:.2f}"])
    with torch.no_grad():
        one_pass = mean_ms(lambda: x + grad, steps)
    rows.append(["x + grad_out, one pass (the pooling backward's memory floor)", "", f"{one_pass:.2f}"])
    few = (*shape[:2], *(2,) * (len(shape) - 2))
    rows += [[name, "", f"{ms:.2f}"] for name, ms in fixed_cost(block, few, x.detach(), steps).items()]
    rows += direct_sequence(native, calls, x.detach(), grad, steps)
    return rows


def direct_sequence(native: object, calls: dict[str, tuple], x: torch.Tensor, grad: torch.Tensor,
                    steps: int) -> list[list[object]]:
    """The step's kernels (with the arguments the block passed them) and its two torch ops, called
    directly in the block's order: no autograd, Python checks or gradient accumulation. Timed
    with the floor's forward in the same rounds, caches evicted, as a ratio within each round: what
    this design costs with no framework at all (the fwd+bwd target's bound)."""
    kernels = ("attention_pool", "transform_forward", "transform_backward", "attention_pool_backward")
    if not all(name in calls for name in kernels):  # e.g. a batch under the thread count: no kernels
        return []
    B, C = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    add = calls["transform_forward"][0].new_zeros(B, C)

    def sequence() -> None:
        with torch.no_grad():
            for name in ("attention_pool", "transform_forward"):
                getattr(native, name)(*calls[name])
            x + add.view(B, C, *(1,) * len(spatial))
            grad.sum(dim=spatial)
            for name in ("transform_backward", "attention_pool_backward"):
                getattr(native, name)(*calls[name])

    def floor() -> None:
        with torch.no_grad():
            x + x.sum(dim=spatial, keepdim=True)

    timings = interleaved({"floor": floor, "direct": sequence}, steps, 3,
                          CacheEviction(CacheEviction.mib_for_this_machine()))
    ratios = paired_ratios(timings["direct"], timings["floor"])
    return [["the step's kernels and ops called directly in order, caches evicted", "",
             f"{timings['direct'].median_ms:.2f}"],
            ["  the same / floor forward (within rounds)", "", f"{statistics.median(ratios):.2f}x"]]


def median_ms_after_a_pass(run: Callable[[], object], x: torch.Tensor, steps: int) -> float:
    """Median ms of a call of `run`, each right after a sum over x (as in a block: the pass evicts
    the call's code and data from L2), after 3 untimed calls."""
    spatial = tuple(range(2, x.dim()))

    def before() -> None:
        with torch.no_grad():
            x.sum(dim=spatial)

    return median_ms_after(run, before, steps)


def median_ms_after(run: Callable[[], object], before: Callable[[], object], steps: int) -> float:
    """Median ms of a call of `run`, each right after `before` (untimed), after 3 untimed calls (a
    median: one late call, e.g. the VM descheduled, would move a mean of these short calls)."""
    return interleaved({"run": run}, steps, 3, before)["run"].median_ms


def fixed_cost(
    block: GlobalContext, shape: tuple[int, ...], x: torch.Tensor, steps: int
) -> dict[str, float]:
    """ms of `block` on a few positions per sample (memory ~0): forward+backward right after a sum
    over x, and forward (eval) and forward+backward right after all caches were evicted (as a
    block finds them behind a layer whose activations exceed the last-level cache). What remains is
    Python, autograd, dispatch and the transforms' products, each finding its code and data gone."""
    generator = torch.Generator().manual_seed(4)
    small = torch.randn(shape, generator=generator).requires_grad_(True)
    grad = torch.randn(shape, generator=generator)
    evict = CacheEviction(CacheEviction.mib_for_this_machine())

    def forward() -> None:
        with torch.no_grad():
            block(small)

    name = shape_name(shape)
    after_pass = median_ms_after_a_pass(lambda: block(small).backward(grad), x, steps)
    block.eval()
    evicted_forward = median_ms_after(forward, evict, steps)
    block.train()
    return {
        f"block fwd+bwd at {name}, after a sum over x (the part that does not scale with x)": after_pass,
        f"block fwd (eval) at {name}, caches evicted": evicted_forward,
        f"block fwd+bwd at {name}, caches evicted": median_ms_after(
            lambda: block(small).backward(grad), evict, steps
        ),
    }


def transforms_forward_after_a_pass(block: GlobalContext, x: torch.Tensor, steps: int) -> tuple[float, float]:
    """ms of the transforms' forward right after a sum over x, as in the block, and back to back (in
    cache)."""
    context = torch.randn(x.shape[:2], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (median_ms_after_a_pass(lambda: block._transforms(context), x, steps),
                mean_ms(lambda: block._transforms(context), steps))


def other_parts(block: GlobalContext, x: torch.Tensor, grad: torch.Tensor, steps: int) -> dict[str, float]:
    """ms per call, alone, of the floor's forward and of the step's parts outside the kernels."""
    B, C = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    generator = torch.Generator().manual_seed(2)
    add = torch.randn(B, C, generator=generator)
    leaf = torch.randn(B, C, generator=generator).requires_grad_(True)
    params = list(block.add_transform.parameters())

    def transforms() -> None:
        with torch.enable_grad():
            torch.autograd.grad(block._transforms(leaf)[1], [leaf, *params], add)

    with torch.no_grad():
        return {
            "floor forward": mean_ms(lambda: x + x.sum(dim=spatial, keepdim=True), steps),
            "fusion: x + add term": mean_ms(lambda: x + add.view(B, C, *(1,) * len(spatial)), steps),
            "grad_out summed over positions": mean_ms(lambda: grad.sum(dim=spatial), steps),
            "transforms (B, C), forward + backward": mean_ms(transforms, steps),
        }


def main(argv: list[str] | None = None) -> dict[str, list[list[object]]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", action="append", help=f"repeatable (default {', '.join(SHAPES)})")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--threads", type=int, default=2)
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    start_run(args.threads, args.system_allocator)
    if not _fused.native_kernels_available():
        print("gcnet._C is not built: nothing to break down")
        return {}
    results = {}
    for name in args.shape or SHAPES:
        shape = tuple(int(size) for size in name.split("x"))
        rows = breakdown(shape, args.steps)
        results[shape_name(shape)] = rows
        print(f"#### {shape_name(shape)}, {args.steps} steps\n")
        header = ["part", "in the block, ms per step", "alone, ms per call"]
        print(markdown_table(header, rows), "\n", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
