"""The CIFAR-10 study: CIFAR ResNet-20 with no block, SE, SNL, GC r16, GC r4 and NL, several seeds each.

    python -m gcnet.study run --results results/cifar10 --seeds 0 1 2 --parallel 2
    python -m gcnet.study summary --results results/cifar10

Every (variant, seed) run is a `gcnet train` child process (config `cifar10_resnet20`, one thread)
in `--work`; a run that finishes writes one small JSON into `--results`, a folder meant to be
committed. A later `run` on any machine skips the runs whose JSON exists and resumes the others
from their last checkpoint if their work folder survived, so the grid can span many sittings.
`summary` turns the folder into a table (mean and standard deviation of test top-1, the paired
per-seed difference from the baseline with a 95% t interval, parameters, MACs, images/s) and a figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gcnet._machine import cpu_isa, cpu_model
from gcnet.config import data_root
from gcnet.engine.checkpoint import atomic_write, has_checkpoint

CONFIG = "cifar10_resnet20"
BASELINE = "none"
# name -> model section keys. CIFAR ResNet-20 has stages of 16, 32 and 64 channels; blocks go into
# every residual block, NL as one embedded-Gaussian block after the second residual block of
# stages 2 (16x16) and 3 (8x8).
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},
    "se": {"context": {"block": "se", "reduction": 16}},
    "snl": {"context": {"block": "snl"}},
    "gc_r16": {"context": {"block": "gc", "reduction": 16}},
    "gc_r4": {"context": {"block": "gc", "reduction": 4}},
    "nl": {"nonlocal_blocks": {"indices": [[], [1], [1]]}},
}
# Two-sided 95% Student t quantiles by degrees of freedom (the paired differences have seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def run_command(work: Path, variant: str, seed: int, epochs: int, data: Path,
                extra: list[str] | None = None) -> list[str]:
    """The `gcnet train` command of one run (--resume when it has a checkpoint, else --overwrite)."""
    command = [sys.executable, "-m", "gcnet.cli", "train", CONFIG,
               "--set", f"train.out_dir={work / run_name(variant, seed)}", "--set", f"train.seed={seed}",
               "--set", f"train.epochs={epochs}", "--set", "train.threads=1", "--set", "train.progress=false",
               "--set", f"data.train={data / 'train'}", "--set", f"data.test={data / 'test'}"]
    for key, value in VARIANTS[variant].items():
        command += ["--set", f"model.{key}={json.dumps(value)}"]
    for override in extra or []:
        command += ["--set", override]
    # Continue from the last checkpoint; a run that died before its first one starts over.
    command.append("--resume" if has_checkpoint(work / run_name(variant, seed)) else "--overwrite")
    return command


def record(work: Path, results: Path, variant: str, seed: int) -> Path | None:
    """Write the result JSON of a finished run (None if it has not finished)."""
    import torch

    from gcnet.builder import load_trained
    from gcnet.engine.metrics import count_flops, count_parameters, read_csv

    run_dir = work / run_name(variant, seed)
    if not (run_dir / "summary.json").is_file():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    trained = load_trained(run_dir)
    size = trained.config.data.image_size
    rows = read_csv(run_dir / "metrics.csv")
    result = {
        "variant": variant, "seed": seed, "model": VARIANTS[variant],
        "test_top1": summary["test"]["top1"], "test_top5": summary["test"]["top5"],
        "test_images": summary["test"]["samples"], "val_top1": (summary["val"] or {}).get("top1"),
        "epochs": trained.config.train.epochs,
        "images_per_epoch": trained.checkpoint.state["step"] // trained.config.train.epochs
        * trained.config.data.batch_size,
        "parameters": count_parameters(trained.model),
        "macs": count_flops(trained.model, torch.randn(1, 3, size, size)),
        # the median epoch: robust to an epoch slowed by other jobs or a paused process
        "train_images_per_s": statistics.median(float(r["images_per_s"]) for r in rows),
        "allocator": trained.checkpoint.state["config"]["train"].get("allocator", "system"),
        "hours": sum(float(r["epoch_time_s"]) for r in rows) / 3600, "threads": trained.config.train.threads,
        "cpu": cpu_model(), "isa": cpu_isa(),
        "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M"),
    }
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{run_name(variant, seed)}.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return path


def run(work: Path, results: Path, data: Path, variants: list[str], seeds: list[int], epochs: int,
        parallel: int, extra: list[str] | None = None) -> int:
    """Run every (variant, seed) without a result JSON, `parallel` at a time; returns how many finished."""
    work.mkdir(parents=True, exist_ok=True)
    queue = [(v, s) for s in seeds for v in variants if not (results / f"{run_name(v, s)}.json").is_file()]
    for variant, seed in list(queue):  # finished in an earlier sitting, but not yet recorded
        if record(work, results, variant, seed) is not None:
            queue.remove((variant, seed))
    running: list[tuple[subprocess.Popen, str, int]] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    done = 0
    while queue or running:
        while queue and len(running) < parallel:
            variant, seed = queue.pop(0)
            log = (work / f"{run_name(variant, seed)}.log").open("a")
            command = run_command(work, variant, seed, epochs, data, extra)
            print(time.strftime("%H:%M:%S"), " ".join(command), flush=True)
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), variant, seed))
        time.sleep(2)
        for entry in list(running):
            child, variant, seed = entry
            if child.poll() is None:
                continue
            running.remove(entry)
            path = record(work, results, variant, seed) if child.returncode == 0 else None
            done += path is not None
            print(time.strftime("%H:%M:%S"), run_name(variant, seed), "exit", child.returncode,
                  f"-> {path}" if path else "(see its log)", flush=True)
    return done


def load_results(results: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """{variant: {seed: result}} of every JSON in the folder."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(results.glob("*.json")):
        result = json.loads(path.read_text())
        out.setdefault(result["variant"], {})[int(result["seed"])] = result
    return out


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean per-seed difference from the baseline and the half-width of its 95% t interval (seeds in both)."""
    common = sorted(set(values) & set(baseline))
    if len(common) < 2:
        return None
    differences = [values[s] - baseline[s] for s in common]
    half = T95.get(len(common) - 1, 1.96) * statistics.stdev(differences) / math.sqrt(len(common))
    return statistics.mean(differences), half, len(common)


def summary_table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Markdown table of the study: accuracy over seeds, paired difference from `none`, cost."""
    lines = ["| block | seeds | test top-1 (%) mean ± std | per seed | vs none (paired, 95% CI) | params | MMACs "
             "| train img/s (1 thread) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    base = {s: r["test_top1"] for s, r in results.get(BASELINE, {}).items()}
    for variant in VARIANTS:
        runs = results.get(variant, {})
        if not runs:
            lines.append(f"| {variant} | 0 | not run yet | | | | | |")
            continue
        accs = {s: r["test_top1"] for s, r in runs.items()}
        spread = f" ± {statistics.stdev(accs.values()):.2f}" if len(accs) > 1 else ""
        diff = paired_difference(accs, base) if variant != BASELINE else None
        shown = f"{diff[0]:+.2f} ± {diff[1]:.2f} (n={diff[2]})" if diff else ("-" if variant == BASELINE else "n < 2")
        first = next(iter(runs.values()))
        lines.append(f"| {variant} | {len(accs)} | {statistics.mean(accs.values()):.2f}{spread} | "
                     f"{', '.join(f'{accs[s]:.2f}' for s in sorted(accs))} | {shown} | {first['parameters']:,} | "
                     f"{first['macs'] / 1e6:.2f} | {statistics.mean(r['train_images_per_s'] for r in runs.values()):.0f} |")
    return "\n".join(lines)


def summary_figure(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> Path | None:
    """Test top-1 per variant: every seed as a dot, the mean as a bar; None without results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v in VARIANTS if results.get(v)]
    if not names:
        return None
    figure, ax = plt.subplots(figsize=(7, 4))
    for x, name in enumerate(names):
        accs = [r["test_top1"] for r in results[name].values()]
        ax.bar(x, statistics.mean(accs), color="#9ecae1", width=0.6)
        ax.plot([x] * len(accs), accs, "o", color="#08519c")
    ax.set_xticks(range(len(names)), names)
    low = min(r["test_top1"] for n in names for r in results[n].values())
    ax.set_ylim(max(0.0, low - 3), None)
    ax.set(ylabel="test top-1 (%)", title="CIFAR-10, CIFAR ResNet-20: bars are means, dots are seeds")
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="run the grid's missing runs")
    go.add_argument("--results", type=Path, default=Path("results/cifar10"))
    go.add_argument("--work", type=Path, default=Path("outputs/study"))
    go.add_argument("--data", type=Path, default=data_root() / "cifar10")
    go.add_argument("--epochs", type=int, default=15)
    go.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    go.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    go.add_argument("--parallel", type=int, default=2)
    go.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="further config overrides for every run (smoke runs)")
    show = commands.add_parser("summary", help="table and figure of the results folder")
    show.add_argument("--results", type=Path, default=Path("results/cifar10"))
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.work, args.results, args.data, args.variants, args.seeds, args.epochs, args.parallel, args.extra)
    results = load_results(args.results)
    table = summary_table(results)
    print(table)
    if results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "summary.md").write_text(table + "\n")
        summary_figure(results, args.results / "summary.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
