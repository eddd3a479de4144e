"""The CIFAR-10 study: ResNet-20 baseline vs +SE vs +GC vs +NL on the full train split, resumable.

    python -m gcnet.study --out outputs/study --epochs 15 --seeds 0 1 --parallel 2

Every (variant, seed) run is a `gcnet train` child process with one thread; `--parallel` of them
share the cores. Re-running the same command resumes unfinished runs from their last checkpoint
and skips finished ones, so the study can span several sessions. `--report` only prints the table.
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
from typing import Any

from gcnet.engine.checkpoint import has_checkpoint
from gcnet.config import data_root
from gcnet.demo import VARIANTS, variant_overrides
from gcnet.engine.metrics import read_csv

CONFIG = "cifar10_resnet20"


def run_command(out: Path, variant: str, seed: int, epochs: int, data: Path) -> list[str]:
    """The `gcnet train` command of one run (--resume when it has a checkpoint, else --overwrite)."""
    command = [sys.executable, "-m", "gcnet.cli", "train", CONFIG,
               "--set", f"train.out_dir={out / f'{variant}_seed{seed}'}", "--set", f"train.seed={seed}",
               "--set", f"train.epochs={epochs}", "--set", "train.threads=1", "--set", "train.progress=false",
               "--set", f"data.train={data / 'train'}", "--set", f"data.test={data / 'test'}"]
    for override in variant_overrides(variant):
        command += ["--set", override]
    # Continue from the last checkpoint; a run that died before its first one starts over.
    command.append("--resume" if has_checkpoint(out / f"{variant}_seed{seed}") else "--overwrite")
    return command


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def report(out: Path, seeds: list[int]) -> str:
    """Markdown table of the finished runs: test top-1 mean and spread over seeds, time per epoch."""
    lines = ["| block | seeds | test top-1 (%) per seed | mean | spread (max-min) | s/epoch | train img/s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for variant in VARIANTS:
        accs, times, speeds, done = [], [], [], []
        for seed in seeds:
            run_dir = out / f"{variant}_seed{seed}"
            if not finished(run_dir):
                continue
            summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
            rows = read_csv(run_dir / "metrics.csv")
            accs.append(summary["test"]["top1"])
            times.extend(float(r["epoch_time_s"]) for r in rows)
            speeds.extend(float(r["images_per_s"]) for r in rows)
            done.append(seed)
        if not accs:
            lines.append(f"| {variant} | - | not finished | | | | |")
            continue
        spread = max(accs) - min(accs)
        lines.append(f"| {variant} | {done} | {', '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} | "
                     f"{spread:.2f} | {statistics.mean(times):.0f} | {statistics.mean(speeds):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/study"))
    parser.add_argument("--data", type=Path, default=data_root() / "cifar10")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args(argv)
    if not args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        queue = [(v, s) for s in args.seeds for v in args.variants if not finished(args.out / f"{v}_seed{s}")]
        running: list[tuple[subprocess.Popen, str]] = []
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        while queue or running:
            while queue and len(running) < args.parallel:
                variant, seed = queue.pop(0)
                log = (args.out / f"{variant}_seed{seed}.log").open("a")
                command = run_command(args.out, variant, seed, args.epochs, args.data)
                print(time.strftime("%H:%M:%S"), " ".join(command), flush=True)
                running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                                f"{variant}_seed{seed}"))
            time.sleep(5)
            for child, name in list(running):
                if child.poll() is not None:
                    print(time.strftime("%H:%M:%S"), name, "exit", child.returncode, flush=True)
                    running.remove((child, name))
    table = report(args.out, args.seeds)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
