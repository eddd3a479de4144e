"""Whole-model cost of the context blocks: ResNet-50 vs + GC r16 (c3-c5) vs + SE r16 (every block),
or with --video Slow-only ResNet-50 vs + GC r16 (res3-res5) vs + 5 NL blocks on 8-frame clips.

    python -m benchmarks.models            # batch 16, 224x224: train step and inference, interleaved
    python -m benchmarks.models --batch 8 --rounds 15   # the ratios with a ~95% interval each
    python -m benchmarks.models --quick    # batch 2, 64x64: a smoke run
    python -m benchmarks.models --unfused-ends   # also with each block's end as three ops
    python -m benchmarks.models --device cuda --batch 32 --composite   # on a GPU, vs the composite path
    python -m benchmarks.models --video --batch 2 --channels-last   # clips, channels_last_3d

A train step is forward, cross-entropy, backward and an SGD (momentum) step; inference is forward
under no_grad in eval mode. The models run in turn within every round, so load from other
processes hits them alike. The ratios to ResNet-50 are medians of the per-round ratios, with a
distribution-free ~95% interval for that median (needs >= 6 rounds to be narrower than the range).
Steps of a few seconds vary by several percent from round to round, more than a few blocks cost;
so afterwards each model's context blocks are also timed inside its own steps (hooks around their
forward and backward): the median share of a step spent in them, a lower bound on the overhead
that ignores their effect on the caches of the layers around them. Hooked blocks run unfused (the
hooks must see their output), so that share is of the block with its own fusion pass.

A residual block ends in ReLU(out + identity), with a context block's add or scale in front where
it sits before the add (GCNet's place); gcnet does that in one pass over out and identity
(`fused_block_ends`). `--unfused-ends` adds ResNet-50 and + GC with those ends as three ops;
`--composite` adds + GC and + SE with their blocks on the plain composite autograd path.

On CUDA every step is followed by a synchronisation, the peak memory of one train step (growth of
the allocator's high-water mark) is reported, and the in-block share is left out (hooks would
time kernel launches, not the kernels).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import (
    add_allocator_option,
    cuda_peak_growth_mib,
    cuda_synchronized,
    interleaved,
    load,
    markdown_table,
    median_interval,
    ms,
    paired_ratios,
    ratio,
    start_run,
    write_json,
)
from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite, composite_autograd
from gcnet.blocks import fused_block_ends
from gcnet.engine.evaluate import to_channels_last
from gcnet.models import create_model

C3_C5 = (False, True, True, True)
# Name -> (registered model, options); the first is the base of the ratios.
MODELS: dict[str, tuple[str, dict]] = {
    "ResNet-50": ("resnet50", {}),
    "ResNet-50 + GC r16 (c3-c5)": ("resnet50", {"context": "gc", "reduction": 16, "stages": C3_C5}),
    "ResNet-50 + SE r16 (all stages)": ("resnet50", {"context": "se", "reduction": 16, "stages": (True,) * 4}),
}
VIDEO_MODELS: dict[str, tuple[str, dict]] = {
    "Slow-only R50": ("slowonly_resnet50", {}),
    "Slow-only R50 + GC r16 (res3-res5)": ("slowonly_resnet50_gc", {}),
    "Slow-only R50 + 5 NL": ("slowonly_resnet50_nl5", {}),
}


class BlockClock:
    """Seconds spent inside a model's context blocks, forward and backward, summed through hooks.

    A block's backward runs between the gradient of its output arriving and that of its input
    being computed; autograd runs the other branch of a residual block before or after it, whole.
    """

    KINDS = (GlobalContext, SqueezeExcite, SimplifiedNonLocal, NonLocal)

    def __init__(self, model: nn.Module) -> None:
        self.seconds = 0.0
        self._started: dict[int, float] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, self.KINDS):
                self._handles += [
                    module.register_forward_pre_hook(lambda m, args: self._start(m)),
                    module.register_forward_hook(lambda m, args, out: self._stop(m)),
                    module.register_full_backward_pre_hook(lambda m, grad_out: self._start(m)),
                    module.register_full_backward_hook(lambda m, grad_in, grad_out: self._stop(m)),
                ]
        if not self._handles:
            raise ValueError(f"no context block ({', '.join(k.__name__ for k in self.KINDS)}) in the model")

    def _start(self, module: nn.Module) -> None:
        self._started[id(module)] = time.perf_counter()

    def _stop(self, module: nn.Module) -> None:
        self.seconds += time.perf_counter() - self._started.pop(id(module))

    def share(self, run: Callable[[], None], rounds: int) -> float:
        """The median over `rounds` calls of the fraction of `run`'s time spent in the blocks."""
        shares = []
        for _ in range(rounds):
            self.seconds = 0.0
            start = time.perf_counter()
            run()
            shares.append(self.seconds / (time.perf_counter() - start))
        return statistics.median(shares)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    def run() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return run


def inference(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(images)

    return run


def within(
    make_context: Callable[[], AbstractContextManager[None]], run: Callable[[], None]
) -> Callable[[], None]:
    """`run` inside a fresh `make_context()` each call, e.g. `fused_block_ends(False)` (each residual
    block's end as three ops) or `composite_autograd` (the blocks on the plain autograd path)."""

    def call() -> None:
        with make_context():
            run()

    return call


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 2 at 64x64, 2 rounds: a smoke run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 2 quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--channels-last", action="store_true",
        help="models and inputs in channels_last (channels_last_3d for --video) memory",
    )
    parser.add_argument("--video", action="store_true", help="Slow-only ResNet-50 models on clips")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip with --video (default 8)")
    parser.add_argument(
        "--unfused-ends", action="store_true",
        help="also time ResNet-50 and + GC with each block's end as three ops (context, add, ReLU)",
    )
    parser.add_argument(
        "--composite", action="store_true",
        help="also time + GC and + SE with their blocks on the composite autograd path",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    gpu = {}
    if cuda:
        gpu["gpu"] = f"{torch.cuda.get_device_name()}, TF32 convolutions {torch.backends.cudnn.allow_tf32}"
    run_info = start_run(args.threads, args.system_allocator, **gpu)
    batch, size = (2, 64) if args.quick else (args.batch, args.size)
    rounds = args.rounds or (2 if args.quick else 3)
    specs = VIDEO_MODELS if args.video else MODELS
    frames = (min(args.frames, 4) if args.quick else args.frames,) if args.video else ()
    images = torch.randn(batch, 3, *frames, size, size)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last_3d if args.video else torch.channels_last)
    images = images.to(args.device)
    labels = torch.randint(0, 1000, (batch,)).to(args.device)
    train, infer, params, models = {}, {}, {}, {}
    for name, (registered, options) in specs.items():
        model = create_model(registered, num_classes=1000, **options).to(args.device)
        if args.channels_last:
            model = to_channels_last(model)
        models[name] = model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        train[name] = train_step(model, optimizer, images, labels)
        infer[name] = inference(model, images)
        params[name] = sum(p.numel() for p in model.parameters())
    if args.unfused_ends:
        for name in list(specs)[:2]:
            params[f"{name}, unfused ends"] = params[name]
            train[f"{name}, unfused ends"] = within(lambda: fused_block_ends(False), train[name])
            infer[f"{name}, unfused ends"] = within(lambda: fused_block_ends(False), infer[name])
    if args.composite:
        for name in list(specs)[1:]:
            params[f"{name}, composite"] = params[name]
            train[f"{name}, composite"] = within(composite_autograd, train[name])
            infer[f"{name}, composite"] = within(composite_autograd, infer[name])
    peaks = {name: cuda_peak_growth_mib(run) for name, run in train.items()} if cuda else {}
    if cuda:
        train = {name: cuda_synchronized(run) for name, run in train.items()}
        infer = {name: cuda_synchronized(run) for name, run in infer.items()}

    load_before = load()
    train_times = interleaved(train, rounds, warmup=1)
    infer_times = interleaved(infer, rounds, warmup=1)
    base = next(iter(specs))
    shares: dict[str, dict[str, float]] = {}
    for name in list(specs)[1:] if not cuda else []:
        clock = BlockClock(models[name])
        shares[name] = {"train": clock.share(train[name], min(rounds, 5)),
                        "infer": clock.share(infer[name], min(rounds, 5))}
        clock.remove()
    rows = []
    for name in train:
        row: dict = {"model": name, "params": params[name], "train_peak_mib": peaks.get(name)}
        row |= {f"{key}_block_share": shares.get(name, {}).get(key) for key in ("train", "infer")}
        for key, times in (("train", train_times), ("infer", infer_times)):
            median, low, high = median_interval(paired_ratios(times[name], times[base]))
            row |= {f"{key}_ms": times[name].median_ms, f"{key}_ratio": median,
                    f"{key}_interval": [low, high]}
        rows.append(row)

    def with_interval(r: dict, key: str) -> str:
        low, high = r[f"{key}_interval"]
        return f"{ratio(r[f'{key}_ratio'])} ({low:.2f}-{high:.2f})"

    def in_blocks(r: dict) -> str:
        if r["train_block_share"] is None:
            return "-"
        return f"{100 * r['train_block_share']:.1f}% / {100 * r['infer_block_share']:.1f}%"

    table = [
        [r["model"], f"{r['params'] / 1e6:.2f}M", ms(r["train_ms"]), with_interval(r, "train"),
         ms(r["infer_ms"]), with_interval(r, "infer"),
         f"{r['train_peak_mib']:.0f} MiB" if cuda else in_blocks(r)]
        for r in rows
    ]
    layout = ("channels_last_3d" if args.video else "channels_last") if args.channels_last else (
        "NCDHW" if args.video else "NCHW")
    extent = "x".join(map(str, (*frames, size, size)))
    print(f"#### {args.device}, batch {batch}, {extent}, {layout}, {rounds} rounds "
          f"(load {load_before} -> {load()})\n")
    header = ["model", "params", "train step ms", f"vs {base} (95%)", "inference ms", f"vs {base} (95%)",
              "train step peak memory" if cuda else "in blocks, train / inference"]
    print(markdown_table(header, table), flush=True)
    result = {
        "device": args.device, "batch": batch, "size": size, "layout": layout,
        "load_before": load_before, "load_after": load(), "rows": rows,
    }
    if args.json:
        write_json(args.json, run_info, result=result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
