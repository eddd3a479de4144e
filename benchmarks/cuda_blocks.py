"""The block benchmarks on a CUDA device: the same cases, shapes and tables as `benchmarks.blocks`.

    python -m benchmarks.cuda_blocks            # GC/SNL/SE and NL at the CPU benchmark's shapes
    python -m benchmarks.cuda_blocks --quick    # tiny shapes, a smoke run

Each timed call is followed by a device synchronisation; before each, a 256 MiB buffer is zeroed so
that no case finds its input in the GPU's L2 (as triton.testing.do_bench does). Peak memory is the
growth of the CUDA allocator's high-water mark during one call of a case, above what was allocated
before it.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks._common import cuda_peak_growth_mib, cuda_synchronized, write_json
from benchmarks.blocks import GC_SHAPES, NL_SHAPES, Case, Shape, build, check_agreement, format_result
from benchmarks.blocks import format_summary, make_inputs, shape_name, time_cases


class L2Flush:
    """Zero a buffer larger than any GPU's L2 before a timed call, then wait for it."""

    def __init__(self, mib: int = 256) -> None:
        self.buffer = torch.empty(mib * 2**20 // 4, device="cuda")

    def __call__(self) -> None:
        self.buffer.zero_()
        torch.cuda.synchronize()


def bench_shape(suite: str, shape: Shape, rounds: int, flush: L2Flush) -> dict:
    x, grad = make_inputs(shape)
    x = x.detach().cuda().requires_grad_(True)
    modules = {name: module.cuda() for name, module in build(suite, shape).items()}
    cases = {name: Case(module, x, grad.cuda()) for name, module in modules.items()}
    agreement = check_agreement(modules, x.detach())
    rows = time_cases(cases, rounds, 2, flush, wrap=cuda_synchronized)
    for row, case in zip(rows, cases.values()):
        case.prepare_forward()
        row["peak_fwd_mib"] = cuda_peak_growth_mib(case.forward)
        case.prepare_forward_backward()
        row["peak_fb_mib"] = cuda_peak_growth_mib(case.forward_backward)
    return {"suite": suite, "shape": shape_name(shape), "load_before": "-", "load_after": "-",
            "max_abs_diff": agreement, "x_mib": x.numel() * x.element_size() / 2**20, "rows": rows}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    parser.add_argument("--suite", choices=["gc", "nl", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per case (default 15; 2 quick)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.cuda_blocks needs a CUDA device; benchmarks.blocks measures the CPU")
    torch.manual_seed(0)
    environment = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cuda": str(torch.version.cuda), "tf32 convolutions": str(torch.backends.cudnn.allow_tf32)}
    print(" | ".join(f"{k}: {v}" for k, v in environment.items()) + "\n", flush=True)
    flush = L2Flush(16 if args.quick else 256)
    plan = [("gc", s) for s in GC_SHAPES[args.quick]] * (args.suite != "nl")
    plan += [("nl", s) for s in NL_SHAPES[args.quick]] * (args.suite != "gc")
    results = []
    for suite, shape in plan:
        huge = suite == "nl" and math.prod(shape[2:]) >= 16384
        rounds = args.rounds or (2 if args.quick else 5 if huge else 15)
        results.append(bench_shape(suite, shape, rounds, flush))
        print(format_result(results[-1]), flush=True)
    print("#### Summary\n\n" + format_summary(results), flush=True)
    if args.json:
        write_json(args.json, environment, results=results)
    return results


if __name__ == "__main__":
    main()
