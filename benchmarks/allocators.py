"""Training throughput under each memory allocator: glibc's default, glibc retaining freed memory
(what `gcnet train` does by default, `train.allocator: retained`), jemalloc and tcmalloc (preloaded).

    python -m benchmarks.allocators                 # CIFAR ResNet-20 b128 and ResNet-50 + GC r16 b8 at 224
    python -m benchmarks.allocators --quick         # a smoke run

Every (case, allocator) runs in a fresh process, because an allocator is chosen at process start;
rounds interleave them, so load from other processes hits all alike. A process times the steps of
gcnet train's loop without data loading (forward, cross-entropy, backward, SGD with momentum) on
fixed random batches after warm-up steps, and reports images/s; the median over rounds is shown,
with the ratio to glibc's default. jemalloc / tcmalloc come from Debian's libjemalloc2 and
libtcmalloc-minimal4; an allocator whose library is absent is skipped and named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import environment, load, markdown_table, write_json
from gcnet._machine import preloaded_allocator, retain_freed_memory

LIBRARIES = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}
ALLOCATORS = ("glibc default", "glibc retained", "jemalloc", "tcmalloc")
# name -> (model, options, batch, image size, classes)
CASES = {
    "CIFAR ResNet-20, batch 128, 32x32": ("cifar_resnet20", {}, 128, 32, 10),
    "ResNet-50 + GC r16, batch 8, 224x224": ("resnet50_gc_r16", {}, 8, 224, 1000),
}


def child(case: str, allocator: str, steps: int, warmup: int, quick: bool) -> None:
    """Time `steps` training steps of `case` in this process and print images/s as JSON."""
    if allocator == "glibc retained":
        retain_freed_memory()
    from gcnet.models import create_model

    name, options, batch, size, classes = CASES[case]
    if quick:
        batch, size = min(batch, 8), min(size, 64)
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, **options).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": steps * batch / seconds, "preloaded": preloaded_allocator()}))


def run_child(case: str, allocator: str, args: argparse.Namespace) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if allocator in LIBRARIES:
        env["LD_PRELOAD"] = LIBRARIES[allocator]
    command = [sys.executable, "-m", "benchmarks.allocators", "--child", case, "--allocator", allocator,
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = allocator if allocator in LIBRARIES else None
    if result["preloaded"] != expected:
        raise RuntimeError(f"{allocator}: the child runs with {result['preloaded'] or 'glibc'}")
    return float(result["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--allocator", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.allocator, args.steps, args.warmup, args.quick)
        return
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    torch.set_num_threads(args.threads)
    info = environment()
    allocators = [a for a in ALLOCATORS if a not in LIBRARIES or Path(LIBRARIES[a]).is_file()]
    missing = [a for a in ALLOCATORS if a not in allocators]
    print(" | ".join(f"{k}: {v}" for k, v in info.items()), f"| load: {load()}",
          f"| not installed: {', '.join(missing)}" if missing else "", "\n", flush=True)
    speeds: dict[str, dict[str, list[float]]] = {c: {a: [] for a in allocators} for c in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            for allocator in allocators:
                speeds[case][allocator].append(run_child(case, allocator, args))
    rows, results = [], {}
    for case, by_allocator in speeds.items():
        base = statistics.median(by_allocator["glibc default"])
        for allocator, values in by_allocator.items():
            median = statistics.median(values)
            spread = f"{min(values):.1f}-{max(values):.1f}"
            rows.append([case, allocator, f"{median:.1f}", spread, f"{median / base:.2f}x"])
            results.setdefault(case, {})[allocator] = values
    print(markdown_table(["case", "allocator", "images/s (median)", "range", "vs glibc default"], rows))
    print(f"\nload after: {load()}")
    if args.json:
        write_json(args.json, info, rounds=args.rounds, steps=args.steps, images_per_s=results)


if __name__ == "__main__":
    main()
