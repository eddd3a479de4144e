"""Block benchmarks: GC (and SNL, SE) against the memory floor, a naive form and timm; NL likewise.

    python -m benchmarks.blocks            # full run (a few minutes on 2 cores)
    python -m benchmarks.blocks --quick    # tiny shapes, a smoke run of every code path
    python -m benchmarks.blocks --suite gc --compile   # add torch.compile'd GC rows
    python -m benchmarks.blocks --suite gc --channels-last   # inputs and weights as training has them

The memory floor of a GC block is one pass over x to pool and one to add: x + x.sum(positions)
broadcast. Forward is timed under no_grad in eval mode; forward+backward in train mode with x and
all parameters requiring grad. Peak memory is the growth of the resident set while one case runs
once, each in a fresh process (`--memory-case` is that process's entry point).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import (
    CacheEviction,
    Timing,
    add_allocator_option,
    interleaved,
    load,
    markdown_table,
    median_interval,
    memory_in_subprocesses,
    ms,
    paired_ratios,
    peak_growth_mib,
    ratio,
    start_run,
    write_json,
)
from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite, _fused
from gcnet.engine.evaluate import channels_last_format, to_channels_last

try:
    from gcnet.blocks import onednn_products
except ImportError:  # an older gcnet under benchmarks.compare: no switch, no rows for it
    onednn_products = None

try:
    import timm.layers as timm_layers
except ImportError:  # timm is the `bench` extra; its rows are left out without it
    timm_layers = None

Shape = tuple[int, ...]

GC_SHAPES: dict[bool, list[Shape]] = {
    False: [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7), (4, 1024, 8, 14, 14)],
    True: [(4, 32, 16, 16), (2, 64, 2, 4, 4)],
}
NL_SHAPES: dict[bool, list[Shape]] = {
    False: [(2, 256, 64, 64), (1, 64, 128, 128), (32, 1024, 14, 14), (4, 1024, 8, 14, 14)],
    True: [(1, 8, 16, 16), (1, 8, 2, 4, 4)],
}
# 1x64x128x128 is the case issue 2 asks about: the naive form needs 1 GiB per N x N matrix.


def shape_name(shape: Shape) -> str:
    return "x".join(map(str, shape))


def randomize_(module: nn.Module) -> nn.Module:
    """Non-zero weights everywhere (zero-init layers would short-cut nothing, but keep it honest)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return module


# --- GC family ---------------------------------------------------------------------------------


class Floor(nn.Module):
    """The memory floor of a GC block: one pass to pool, one to add."""

    def forward(self, x: Tensor) -> Tensor:
        return x + x.sum(dim=tuple(range(2, x.dim())), keepdim=True)


class NaiveGlobalContext(nn.Module):
    """GC as mmcv's ContextBlock writes it (1x1 conv mask, 4D matmul, transform).

    Shares `block`'s weights, so its output equals the block's.
    """

    def __init__(self, block: GlobalContext) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        key = self.block.key
        conv = {4: F.conv2d, 5: F.conv3d}[x.dim()]
        mask = conv(x, key.weight.view(1, C, *([1] * (x.dim() - 2))), key.bias)  # (B, 1, *positions)
        mask = mask.view(B, 1, -1).softmax(dim=2).unsqueeze(-1)  # (B, 1, N, 1)
        context = torch.matmul(x.view(B, C, -1).unsqueeze(1), mask).view(B, C)  # (B, 1, C, N) @ (B, 1, N, 1)
        term = self.block.add_transform(context)  # (B, C)
        return x + term.view(B, C, *([1] * (x.dim() - 2)))


class TimmGlobalContext(nn.Module):
    """timm's GlobalContext(fuse_add=True, fuse_scale=False), r16, weights copied from `block`.

    timm's block is 2D only; a 3D input is viewed as (B, C, T*H, W), the same pooling over all
    positions at no cost.
    """

    def __init__(self, block: GlobalContext) -> None:
        super().__init__()
        C = block.channels
        self.inner = timm_layers.GlobalContext(
            C, fuse_add=True, fuse_scale=False, rd_channels=C // block.reduction
        )
        transform = block.add_transform
        with torch.no_grad():
            self.inner.conv_attn.weight.copy_(block.key.weight.view(1, C, 1, 1))
            self.inner.conv_attn.bias.copy_(block.key.bias)
            mlp = self.inner.mlp_add
            mlp.fc1.weight.copy_(transform[0].weight[..., None, None])
            mlp.fc1.bias.copy_(transform[0].bias)
            mlp.norm.weight.copy_(transform[1].weight)
            mlp.norm.bias.copy_(transform[1].bias)
            mlp.norm.eps = transform[1].eps  # timm's LayerNorm2d defaults to 1e-6
            mlp.fc2.weight.copy_(transform[3].weight[..., None, None])
            mlp.fc2.bias.copy_(transform[3].bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 5:
            B, C, T, H, W = x.shape
            return self.inner(x.view(B, C, T * H, W)).view(B, C, T, H, W)
        return self.inner(x)


class InContext(nn.Module):
    """Run `block` inside a context from `make_context`, e.g. gcnet.blocks.composite_autograd."""

    def __init__(self, block: nn.Module, make_context: Callable[[], AbstractContextManager[None]]) -> None:
        super().__init__()
        self.block = block
        self.make_context = make_context

    def forward(self, x: Tensor) -> Tensor:
        with self.make_context():
            return self.block(x)


def gc_cases(shape: Shape, compile_: bool = False) -> dict[str, nn.Module]:
    C = shape[1]
    gc = randomize_(GlobalContext(C, reduction=16))
    cases: dict[str, nn.Module] = {
        "floor (x + x.sum over positions)": Floor(),
        "gcnet GC r16 (add)": gc,
    }
    if _fused.native_kernels_available():
        cases["gcnet GC, PyTorch ops (no CPU kernels)"] = InContext(gc, lambda: _fused.native_kernels(False))
    cases |= {
        "gcnet GC, composite autograd": InContext(gc, _fused.composite_autograd),
        "naive GC (mmcv-style)": NaiveGlobalContext(gc),
    }
    if timm_layers is not None:
        cases["timm GlobalContext (add, r16)"] = TimmGlobalContext(gc)
    cases["gcnet SNL"] = randomize_(SimplifiedNonLocal(C))
    se = randomize_(SqueezeExcite(C, reduction=16))
    cases["gcnet SE r16"] = se
    if _fused.native_kernels_available():
        cases["gcnet SE, PyTorch ops (no CPU kernels)"] = InContext(se, lambda: _fused.native_kernels(False))
    cases["gcnet SE, composite autograd"] = InContext(se, _fused.composite_autograd)
    cases["gcnet both fusions (scale + add), r16"] = randomize_(GlobalContext(C, reduction=16, fusion="both"))
    if compile_:
        cases["gcnet GC, torch.compile"] = torch.compile(gc)
    return cases


# --- NL ------------------------------------------------------------------------------------------


class NaiveNonLocal(nn.Module):
    """The embedded Gaussian NL as the released code writes it: theta^T phi as an N x N matrix, softmax, @ g.

    Shares `block`'s weights (theta, phi, g, W_z, BN), so its output equals the block's.
    """

    def __init__(self, block: NonLocal) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        block = self.block
        positions = x.flatten(2)  # (B, C, N)

        def project(layer: nn.Linear) -> Tensor:
            return torch.matmul(layer.weight, positions) + layer.bias[:, None]  # (B, C', N)

        theta, phi, g = project(block.theta), project(block.phi), project(block.g)
        f = torch.bmm(theta.transpose(1, 2), phi) * block.scale_factor  # (B, N, N)
        y = torch.bmm(f.softmax(dim=-1), g.transpose(1, 2))  # (B, N, C')
        out = block.w_z(y).transpose(1, 2)  # (B, C, N)
        return x + block.bn(out).view(x.shape)


class TimmNonLocal(nn.Module):
    """timm's NonLocalAttn with C' = C/2 and no scaling (the NL paper's embedded Gaussian); 2D only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = timm_layers.NonLocalAttn(channels, use_scale=False, rd_channels=channels // 2)
        self.inner = randomize_(inner)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def nl_cases(shape: Shape) -> dict[str, nn.Module]:
    C, dims = shape[1], len(shape) - 2
    nl = randomize_(NonLocal(C, mode="embedded_gaussian", dims=dims))
    cases: dict[str, nn.Module] = {"gcnet NL": nl, "naive NL (N x N bmm)": NaiveNonLocal(nl)}
    if torch.backends.mkldnn.is_available() and onednn_products is not None:  # does the probe's choice pay?
        cases["gcnet NL, oneDNN products"] = InContext(nl, lambda: onednn_products(True))
        cases["gcnet NL, MKL products (bmm, SDPA)"] = InContext(nl, lambda: onednn_products(False))
    # timm's form is 2D only, and at 128x128 one naive (N x N) form is enough to wait for.
    if timm_layers is not None and dims == 2 and math.prod(shape[2:]) < 16384:
        cases["timm NonLocalAttn (C'=C/2, no scale)"] = TimmNonLocal(C)
    return cases


# --- running -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One module on one input, runnable as forward (no_grad, eval) or forward+backward (train).

    Each run needs its `prepare_` call first, untimed: a network sets the mode and clears the
    gradients once per step, not once per block.
    """

    module: nn.Module
    x: Tensor
    grad: Tensor

    def prepare_forward(self) -> None:
        self.module.eval()

    def forward(self) -> Tensor:
        with torch.no_grad():
            return self.module(self.x)

    def prepare_forward_backward(self) -> None:
        self.module.train()
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)

    def forward_backward(self) -> None:
        # The backward of an InContext case runs in its context too (e.g. without the CPU kernels).
        with self.module.make_context() if isinstance(self.module, InContext) else contextlib.nullcontext():
            self.module(self.x).backward(self.grad)


def make_inputs(shape: Shape, channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """x (requiring grad) and grad_out, in channels_last (channels_last_3d) memory when asked."""
    generator = torch.Generator().manual_seed(1)
    x, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    if channels_last:
        x, grad = (t.contiguous(memory_format=channels_last_format(t)) for t in (x, grad))
    return x.requires_grad_(True), grad


def build(suite: str, shape: Shape, compile_: bool = False, channels_last: bool = False) -> dict[str, nn.Module]:
    cases = gc_cases(shape, compile_) if suite == "gc" else nl_cases(shape)
    return {name: to_channels_last(m) for name, m in cases.items()} if channels_last else cases


# Cases computing the same function with the same weights: their outputs must agree.
SAME_FUNCTION = ("gcnet GC", "naive GC", "timm GlobalContext", "gcnet NL", "naive NL")


def check_agreement(cases: dict[str, nn.Module], x: Tensor) -> float:
    """Largest |difference| between the outputs of the cases that share weights (eval mode)."""
    outputs = []
    with torch.no_grad():
        for name, module in cases.items():
            if name.startswith(SAME_FUNCTION) and "compile" not in name:
                outputs.append(module.eval()(x))
    return max((float((o - outputs[0]).abs().max()) for o in outputs[1:]), default=0.0)


def run_memory_case(spec: str, threads: int) -> None:
    """Entry of the fresh process: build one case, print {"peak_mib": ...} for one run."""
    torch.set_num_threads(threads)
    suite, shape_text, layout, rest = spec.split(":", 3)
    name, mode = rest.rsplit(":", 1)  # a case's name may hold a colon
    shape = tuple(int(s) for s in shape_text.split("x"))
    channels_last = layout == "channels_last"
    x, grad = make_inputs(shape, channels_last)
    case = Case(build(suite, shape, channels_last=channels_last)[name], x, grad)
    run = case.forward if mode == "fwd" else case.forward_backward
    (case.prepare_forward if mode == "fwd" else case.prepare_forward_backward)()
    print(json.dumps({"peak_mib": peak_growth_mib(run)}))


def time_cases(
    cases: dict[str, Case], rounds: int, warmup: int, before_each: Callable[[], None] | None = None,
    wrap: Callable[[Callable[[], object]], Callable[[], object]] = lambda run: run,
) -> list[dict]:
    """Every case's forward and forward+backward in the same rounds: a row per case with the medians
    and each round's seconds, so that a ratio can be taken within each round (`paired`)."""
    runs = {f"{n}:fwd": wrap(c.forward) for n, c in cases.items()}
    runs |= {f"{n}:fb": wrap(c.forward_backward) for n, c in cases.items()}
    setups = {f"{n}:fwd": c.prepare_forward for n, c in cases.items()}
    setups |= {f"{n}:fb": c.prepare_forward_backward for n, c in cases.items()}
    timings = interleaved(runs, rounds, warmup, before_each, setups)
    return [
        {"case": n, "fwd_ms": timings[f"{n}:fwd"].median_ms, "fb_ms": timings[f"{n}:fb"].median_ms,
         "fwd_s": timings[f"{n}:fwd"].seconds, "fb_s": timings[f"{n}:fb"].seconds}
        for n in cases
    ]


def paired(numerator: dict, num_key: str, denominator: dict, den_key: str) -> tuple[float, float, float]:
    """Median (~95% interval) of numerator / denominator within each round (keys "fwd" or "fb").

    Memory bandwidth on a shared VM drifts (the floor's forward at 32x1024x14x14 took 2.2-3.6 ms in
    one day); a ratio within a round cancels what a ratio of medians taken minutes apart would not.
    """
    rounds = paired_ratios(Timing(numerator[f"{num_key}_s"]), Timing(denominator[f"{den_key}_s"]))
    return median_interval(rounds)


def bench_shape(
    suite: str, shape: Shape, rounds: int, memory: bool, compile_: bool, quick: bool,
    evict: CacheEviction | None = None, channels_last: bool = False,
) -> dict:
    x, grad = make_inputs(shape, channels_last)
    modules = build(suite, shape, compile_, channels_last)
    cases = {name: Case(module, x, grad) for name, module in modules.items()}
    load_before = load()
    agreement = check_agreement(modules, x.detach())
    # Warm: x is read just before each call, as a block finds the input its previous layer just wrote
    # (not whatever the case before left in cache: a forward+backward evicts x at these sizes).
    rows = time_cases(cases, rounds, 2 if suite == "gc" else 1, evict or x.detach().sum)
    peaks: dict[str, float | str] = {}
    if memory:
        names = [n for n in cases if "compile" not in n]
        names = names[:2] if quick else names
        layout = "channels_last" if channels_last else "contiguous"
        specs = [f"{suite}:{shape_name(shape)}:{layout}:{n}:{m}" for n in names for m in ("fwd", "fb")]
        peaks = memory_in_subprocesses("benchmarks.blocks", specs, workers=2 if suite == "gc" else 1)
        peaks = {k.split(":", 3)[3]: v for k, v in peaks.items()}  # "name:mode" -> MiB
    for row in rows:
        row["peak_fwd_mib"] = peaks.get(f"{row['case']}:fwd")
        row["peak_fb_mib"] = peaks.get(f"{row['case']}:fb")
    return {
        "suite": suite,
        "shape": shape_name(shape),
        "load_before": load_before,
        "load_after": load(),
        "max_abs_diff": agreement,
        "x_mib": x.numel() * x.element_size() / 2**20,
        "rows": rows,
    }


def format_memory(value: float | str | None) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.0f}"


def format_result(result: dict) -> str:
    rows = result["rows"]
    title = (
        f"{result['suite'].upper()} {result['shape']} (x: {result['x_mib']:.0f} MiB; "
        f"load {result['load_before']} -> {result['load_after']}; "
        f"outputs agree to {result['max_abs_diff']:.1e})"
    )
    if result["suite"] == "gc":
        floor = rows[0]
        timm = next((r for r in rows if r["case"].startswith("timm")), None)
        header = ["case", "fwd ms", "fwd / floor", "fwd+bwd ms", "fwd+bwd / floor fwd",
                  "fwd+bwd / floor fwd+bwd", "timm fwd+bwd / this", "peak fwd MiB", "peak fwd+bwd MiB"]
        table = [
            [
                r["case"], ms(r["fwd_ms"]), paired_text(r, "fwd", floor, "fwd"), ms(r["fb_ms"]),
                paired_text(r, "fb", floor, "fwd"), paired_text(r, "fb", floor, "fb"),
                "-" if timm is None else paired_text(timm, "fb", r, "fb"),
                format_memory(r["peak_fwd_mib"]), format_memory(r["peak_fb_mib"]),
            ]
            for r in rows
        ]
    else:
        naive = next(r for r in rows if r["case"].startswith("naive"))
        header = ["case", "fwd ms", "naive fwd / this", "fwd+bwd ms", "naive fwd+bwd / this",
                  "peak fwd MiB", "peak fwd+bwd MiB"]
        table = [
            [
                r["case"], ms(r["fwd_ms"]), paired_text(naive, "fwd", r, "fwd"), ms(r["fb_ms"]),
                paired_text(naive, "fb", r, "fb"),
                format_memory(r["peak_fwd_mib"]), format_memory(r["peak_fb_mib"]),
            ]
            for r in rows
        ]
    return f"#### {title}\n\n{markdown_table(header, table)}\n"


def _row(result: dict, prefix: str) -> dict | None:
    return next((r for r in result["rows"] if r["case"].startswith(prefix)), None)


def paired_text(
    numerator: dict, num_key: str, denominator: dict, den_key: str, interval: bool = False
) -> str:
    """`paired` as text: "1.23x", or "1.23x (1.10-1.31)" with its interval."""
    middle, low, high = paired(numerator, num_key, denominator, den_key)
    return ratio(middle) + (f" ({low:.2f}-{high:.2f})" if interval else "")


def _speedup(result: dict, slow: str, fast: str, key: str) -> str:
    """slow row's time / fast row's time, e.g. how much faster the CPU kernels are than the PyTorch ops."""
    a, b = _row(result, slow), _row(result, fast)
    return "-" if a is None or b is None else paired_text(a, key, b, key)


def format_summary(results: list[dict]) -> str:
    """The ratios the targets name, one row per shape (docs/benchmarks.md keeps these tables)."""
    out = []
    gc = [r for r in results if r["suite"] == "gc"]
    if gc:
        header = ["shape", "GC fwd / floor", "GC fwd+bwd / floor fwd", "kernels vs PyTorch ops fwd, fwd+bwd",
                  "timm fwd+bwd / GC", "SE fwd+bwd / floor fwd", "SE kernels vs PyTorch ops fwd+bwd"]
        table = []
        for result in gc:
            floor, block, se = (_row(result, name) for name in ("floor", "gcnet GC r16", "gcnet SE r16"))
            table.append([
                result["shape"], paired_text(block, "fwd", floor, "fwd", interval=True),
                paired_text(block, "fb", floor, "fwd", interval=True),
                _speedup(result, "gcnet GC, PyTorch", "gcnet GC r16", "fwd") + ", "
                + _speedup(result, "gcnet GC, PyTorch", "gcnet GC r16", "fb"),
                _speedup(result, "timm", "gcnet GC r16", "fb"),
                paired_text(se, "fb", floor, "fwd", interval=True),
                _speedup(result, "gcnet SE, PyTorch", "gcnet SE r16", "fb"),
            ])
        out.append(markdown_table(header, table))
    nl = [r for r in results if r["suite"] == "nl"]
    if nl:
        header = ["shape", "naive fwd / NL", "naive fwd+bwd / NL", "NL peak fwd, fwd+bwd (% of naive)",
                  "MKL / oneDNN products, NL fwd, fwd+bwd"]
        table = []
        for result in nl:
            block, naive = _row(result, "gcnet NL"), _row(result, "naive NL")
            peaks = "-"
            measured = [row[k] for row in (block, naive) for k in ("peak_fwd_mib", "peak_fb_mib")]
            if all(isinstance(v, (int, float)) for v in measured):
                peaks = ", ".join(f"{block[k]:.0f} MiB ({100 * block[k] / naive[k]:.1f}%)"
                                  for k in ("peak_fwd_mib", "peak_fb_mib"))
            mkl, onednn = "gcnet NL, MKL products", "gcnet NL, oneDNN products"
            table.append([result["shape"], _speedup(result, "naive NL", "gcnet NL", "fwd"),
                          _speedup(result, "naive NL", "gcnet NL", "fb"), peaks,
                          ", ".join(_speedup(result, mkl, onednn, key) for key in ("fwd", "fb"))])
        out.append(markdown_table(header, table))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    parser.add_argument("--suite", choices=["gc", "nl", "all"], default="all")
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="timed rounds per case (default 9 GC, 3 NL, 1 NL at 128x128; 2 quick)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile'd GC rows (compiles per shape)"
    )
    parser.add_argument("--shape", action="append", help="only these shapes, e.g. 32x256x56x56 (repeatable)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument(
        "--warm-cache", action="store_true",
        help="read x just before each timed call instead of evicting the CPU caches",
    )
    parser.add_argument(
        "--channels-last", action="store_true",
        help="x, grad_out and weights in channels_last (channels_last_3d) memory, as training configs set it",
    )
    add_allocator_option(parser)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        run_memory_case(args.memory_case, args.threads)
        return []
    evict = None
    if not args.warm_cache:
        evict = CacheEviction(16 if args.quick else CacheEviction.mib_for_this_machine())
    caches = f"evicted before each call ({evict.mib} MiB buffer)" if evict else "warm (x read before each)"
    layout = "channels_last" if args.channels_last else "contiguous (NCHW)"
    run_info = start_run(args.threads, args.system_allocator, **{"cache mode": caches, "layout": layout})
    results = []
    plan: list[tuple[str, Shape]] = []
    if args.suite in ("gc", "all"):
        plan += [("gc", s) for s in GC_SHAPES[args.quick]]
    if args.suite in ("nl", "all"):
        plan += [("nl", s) for s in NL_SHAPES[args.quick]]
    if args.shape:
        plan = [(suite, shape) for suite, shape in plan if shape_name(shape) in args.shape]
    for suite, shape in plan:
        # NL at 128x128 takes seconds per run (the naive form multiplies 16384 x 16384 matrices).
        huge = suite == "nl" and math.prod(shape[2:]) >= 16384
        rounds = args.rounds or (2 if args.quick else 9 if suite == "gc" else 1 if huge else 3)
        # Quick mode measures memory once per suite (fresh processes cost seconds each).
        first = shape == (GC_SHAPES if suite == "gc" else NL_SHAPES)[args.quick][0]
        memory = not args.no_memory and (first or not args.quick)
        result = bench_shape(suite, shape, rounds, memory, args.compile and suite == "gc", args.quick, evict,
                             args.channels_last)
        results.append(result)
        print(format_result(result), flush=True)
    if results:
        print("#### Summary\n\n" + format_summary(results), flush=True)
    if args.json:
        write_json(args.json, run_info, results=results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
