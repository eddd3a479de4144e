"""The CIFAR-10 study: CIFAR ResNet-20 with no block, SE, SNL, GC r16, GC r4 and NL, several seeds each.

    python -m gcnet.study run --results results/cifar10 --seeds 0 1 2 --parallel 2
    python -m gcnet.study summary --results results/cifar10
    python -m gcnet.study speed --results results/cifar10  # clean images/s: training steps, interleaved
    python -m gcnet.study nl --results results/cifar10     # NL runs: query statistics, NL -> SNL conversion

Every (variant, seed) run is a `gcnet train` child process (config `cifar10_resnet20`, one thread)
in `--work`; a run that finishes writes one small JSON into `--results`, a folder meant to be
committed. A later `run` on any machine skips the runs whose JSON exists and resumes the others
from their last checkpoint if their work folder survived, so the grid can span many sittings.
The NL runs also keep their trained weights in `--results` (`checkpoints/`, ~1 MB each), which the
`nl` analysis reads, so it too works on a machine that lacks the work folder.
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

from gcnet._checks import check_positive_int
from gcnet._machine import cpu_isa, cpu_model
from gcnet.config import data_root
from gcnet.engine.checkpoint import STATE, WEIGHTS, Checkpoint, atomic_write, has_checkpoint

CONFIG = "cifar10_resnet20"
BASELINE = "none"
# name -> model section keys. CIFAR ResNet-20 has stages of 16, 32 and 64 channels; blocks go into
# every residual block of stages 2 and 3 (the model's default, GCNet's c3-c5), NL as one
# embedded-Gaussian block after the second residual block of stages 2 (16x16) and 3 (8x8).
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},
    "se": {"context": {"block": "se", "reduction": 16}},
    "snl": {"context": {"block": "snl"}},
    "gc_r16": {"context": {"block": "gc", "reduction": 16}},
    "gc_r4": {"context": {"block": "gc", "reduction": 4}},
    "nl": {"nonlocal_blocks": {"indices": [[], [1], [1]]}},
}
# Variants whose trained weights the results folder keeps (the `nl` analysis needs them).
KEEP_WEIGHTS = ("nl",)
# Two-sided 95% Student t quantiles by degrees of freedom (the paired differences have seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def model_settings(model: dict[str, Any]) -> dict[str, Any]:
    """Model section keys -> values (e.g. a VARIANTS entry) as config keys `model.*` -> values."""
    return {f"model.{key}": value for key, value in model.items()}


def overrides(settings: dict[str, Any]) -> list[str]:
    """`--set` values (KEY=VALUE, JSON where not a string) of config keys -> values."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in settings.items()]


def train_command(out_dir: Path, seed: int, epochs: int, train: Path | str, test: Path | str,
                  settings: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    """`gcnet train` of the study's config on one thread with `settings` (key -> value) and `extra`."""
    command = [sys.executable, "-m", "gcnet.cli", "train", CONFIG,
               "--set", f"train.out_dir={out_dir}", "--set", f"train.seed={seed}",
               "--set", f"train.epochs={epochs}", "--set", "train.threads=1", "--set", "train.progress=false",
               "--set", f"data.train={train}", "--set", f"data.test={test}"]
    for override in overrides(settings) + (extra or []):
        command += ["--set", override]
    return command


def child_environment() -> dict[str, str]:
    """One OpenMP thread per child, and no spinning while it waits."""
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def run_command(work: Path, variant: str, seed: int, epochs: int, data: Path,
                extra: list[str] | None = None) -> list[str]:
    """The `gcnet train` command of one run (--resume when it has a checkpoint, else --overwrite)."""
    out_dir = work / run_name(variant, seed)
    settings = model_settings(VARIANTS[variant])
    command = train_command(out_dir, seed, epochs, data / "train", data / "test", settings, extra)
    # Continue from the last checkpoint; a run that died before its first one starts over.
    return command + ["--resume" if has_checkpoint(out_dir) else "--overwrite"]


def kept_checkpoint(results: Path, variant: str, seed: int) -> Path:
    """The folder in `results` that keeps a finished run's weights (a checkpoint `load_trained` reads)."""
    return results / "checkpoints" / run_name(variant, seed)


def needs_weights(results: Path, variant: str, seed: int) -> bool:
    """Whether a recorded run of a KEEP_WEIGHTS variant lacks its kept weights (lost with its work folder)."""
    return variant in KEEP_WEIGHTS and not (kept_checkpoint(results, variant, seed) / WEIGHTS).is_file()


def keep_checkpoint(ckpt: Checkpoint, folder: Path) -> Path:
    """Copy a loaded checkpoint into `folder` without its optimizer, scheduler and RNG state."""
    import shutil

    import torch

    state = {k: v for k, v in ckpt.state.items() if k not in ("optimizer", "scheduler", "scaler", "rng")}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / STATE, lambda tmp: torch.save(state, tmp))
    atomic_write(folder / WEIGHTS, lambda tmp: shutil.copyfile(ckpt.path / WEIGHTS, tmp))
    return folder


def record(work: Path, results: Path, variant: str, seed: int) -> Path | None:
    """Write the result JSON of a finished run (None if it has not finished); keep its weights if
    its variant is in KEEP_WEIGHTS."""
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
        # the fastest epoch: other jobs and paused processes only ever slow an epoch down
        "train_images_per_s": max(float(r["images_per_s"]) for r in rows),
        "allocator": trained.checkpoint.state["config"]["train"].get("allocator", "system"),
        "hours": sum(float(r["epoch_time_s"]) for r in rows) / 3600, "threads": trained.config.train.threads,
        "cpu": cpu_model(), "isa": cpu_isa(),
        "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M"),
    }
    results.mkdir(parents=True, exist_ok=True)
    if variant in KEEP_WEIGHTS:
        keep_checkpoint(trained.checkpoint, kept_checkpoint(results, variant, seed))
    path = result_path(results, variant, seed)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return path


def result_path(results: Path, variant: str, seed: int) -> Path:
    """The run's result JSON in the results folder."""
    return results / f"{run_name(variant, seed)}.json"


def finished(results: Path, variant: str, seed: int) -> bool:
    """Whether `results` holds the run's JSON (and its kept weights, for a KEEP_WEIGHTS variant)."""
    return result_path(results, variant, seed).is_file() and not needs_weights(results, variant, seed)


def run(work: Path, results: Path, data: Path, variants: list[str], seeds: list[int], epochs: int,
        parallel: int, extra: list[str] | None = None) -> int:
    """Run every (variant, seed) without a result JSON, `parallel` at a time, then the recorded runs
    whose kept weights are missing (their JSON is rewritten); returns how many finished.

    A queued run that another driver finished meanwhile (same folders) is skipped when its turn comes.
    """
    work.mkdir(parents=True, exist_ok=True)
    grid = [(v, s) for s in seeds for v in variants]
    # Runs without a JSON first, then the recorded ones that lack their kept weights.
    queue = sorted((run for run in grid if not finished(results, *run)),
                   key=lambda run: result_path(results, *run).is_file())
    for variant, seed in list(queue):  # finished in an earlier sitting, but not yet recorded
        if record(work, results, variant, seed) is not None:
            queue.remove((variant, seed))
    running: list[tuple[subprocess.Popen, str, int]] = []
    env = child_environment()
    done = 0
    while queue or running:
        while queue and len(running) < parallel:
            variant, seed = queue.pop(0)
            if finished(results, variant, seed):
                print(time.strftime("%H:%M:%S"), run_name(variant, seed), "finished elsewhere", flush=True)
                continue
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


# The trained NL blocks become SNL blocks at the same places (`gcnet convert-nl`), then fine-tune for
# one epoch at the learning rate the cosine schedule had reached in its last epochs.
CONVERTED = {"nonlocal_blocks": {"indices": [[], [1], [1]], "block": "snl"}}
FINETUNE_LR = 1e-3


def _query_statistics(model: Any, inputs: list[Any]) -> dict[str, dict[str, float]]:
    from gcnet.analysis.attention import attention_maps
    from gcnet.analysis.statistics import QueryStatistics

    running = QueryStatistics()
    model.eval()
    for batch in inputs:
        running.update(attention_maps(model, batch))
    return running.summary()


def _latency_ms(models: dict[str, Any], batch: Any, rounds: int = 10) -> dict[str, float]:
    """Median forward time (no_grad, eval, one thread) of each model on `batch`, interleaved."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model in models.values():
            model.eval()
        with torch.no_grad():
            for index in range(rounds + 2):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(batch)
                    if index >= 2:
                        times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(values) for name, values in times.items()}


def convert_nl(work: Path, results: Path, seed: int, batches: int = 4, batch_size: int = 32,
               latency_batch: int = 128, extra: list[str] | None = None) -> Path | None:
    """Issue 15's NL analysis of the trained run nl_seed<k>: query statistics trained and at init,
    conversion to SNL (before, after, after one fine-tuning epoch), MACs and latency.

    Writes `results/conversion/nl_seed<k>.json` and a statistics figure; None if the run has not finished.
    """
    import itertools

    import torch

    from gcnet.analysis.figures import plot_statistics
    from gcnet.analysis.nl_to_gc import convert_checkpoint
    from gcnet.analysis.report import batches_of
    from gcnet.builder import build_model, load_trained

    name = run_name("nl", seed)
    run_dir = kept_checkpoint(results, "nl", seed)
    if not finished(results, "nl", seed):
        return None
    trained = load_trained(run_dir)
    config = trained.config
    inputs = list(itertools.islice(batches_of(trained.eval_dataset(config.data.test), batch_size), batches))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        initial = build_model(config, trained.checkpoint.state.get("num_classes"))
    stats = {"trained": _query_statistics(trained.model, inputs), "init": _query_statistics(initial, inputs)}

    converted_dir = work / f"{name}_converted"
    report = convert_checkpoint(run_dir, config.data.test, converted_dir, batches=batches,
                                batch_size=batch_size)
    finetune_dir = work / f"{name}_finetune"
    settings = model_settings(CONVERTED) | {
        "model.weights": str(converted_dir / "converted.safetensors"), "model.weights_source": "gcnet",
        "optim.lr": FINETUNE_LR, "schedule.warmup_epochs": 0}
    command = train_command(finetune_dir, seed, 1, config.data.train, config.data.test, settings, extra)
    with (work / f"{name}_finetune.log").open("a") as log:
        subprocess.run(command + ["--overwrite"], stdout=log, stderr=subprocess.STDOUT,
                       env=child_environment(), check=True)
    finetuned = json.loads((finetune_dir / "summary.json").read_text())
    snl = load_trained(finetune_dir).model
    size = config.data.image_size
    example = torch.randn(latency_batch, 3, size, size)
    latency = _latency_ms({"original": trained.model, "converted": snl}, example)

    out = results / "conversion"
    out.mkdir(parents=True, exist_ok=True)
    both = {f"{when}: {block}": values for when, summary in stats.items()
            for block, values in summary.items()}
    plot_statistics(both, out / f"{name}_statistics.png")
    result = {
        "seed": seed, "test_images": report["samples"],
        "test_top1": {"original": report["top1"]["original"], "converted": report["top1"]["converted"],
                      "finetuned_1_epoch": finetuned["test"]["top1"]},
        "macs": report["macs"], "latency_ms": latency, "latency_batch": latency_batch, "latency_threads": 1,
        "fit": report["blocks"], "calibration": {"source": report["calibration"], "batches": batches,
                                                  "batch_size": batch_size},
        "finetune": {"epochs": 1, "lr": FINETUNE_LR, "schedule": "cosine, no warm-up"},
        "query_statistics": stats, "statistics_inputs": sum(len(b) for b in inputs),
        "cpu": cpu_model(), "finished": time.strftime("%Y-%m-%d %H:%M"),
    }
    path = out / f"{name}.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return path


def conversion_table(results: Path) -> str:
    """Markdown: per converted run, test top-1 before / after / after fine-tuning, MACs and latency,
    and the trained vs initial query statistics of every NL block."""
    rows = [json.loads(p.read_text()) for p in sorted((results / "conversion").glob("nl_seed*.json"))]
    if not rows:
        return "No NL run converted yet."
    lines = ["| seed | NL top-1 | converted, no retraining | + 1 epoch fine-tuning | MACs NL -> SNL | "
             "latency ms NL -> SNL (batch, 1 thread) |", "|---|---|---|---|---|---|"]
    for r in rows:
        top1, macs, ms = r["test_top1"], r["macs"], r["latency_ms"]
        lines.append(f"| {r['seed']} | {top1['original']:.2f} | {top1['converted']:.2f} | "
                     f"{top1['finetuned_1_epoch']:.2f} | {macs['original'] / 1e6:.2f}M -> "
                     f"{macs['converted'] / 1e6:.2f}M | {ms['original']:.1f} -> {ms['converted']:.1f} "
                     f"({r['latency_batch']}) |")
    lines += ["", "| seed | block | cosine distance of maps, trained (init) | JS of maps, trained (init) | "
              "outputs, trained (init) |", "|---|---|---|---|---|"]

    def cell(value: float) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"

    for r in rows:
        trained, init = r["query_statistics"]["trained"], r["query_statistics"]["init"]
        for block in trained:
            t, i = trained[block], init[block]
            lines.append(f"| {r['seed']} | {block} | {cell(t['attention'])} ({cell(i['attention'])}) | "
                         f"{cell(t['js'])} ({cell(i['js'])}) | {cell(t['output'])} ({cell(i['output'])}) |")
    return "\n".join(lines)


SPEED = Path("speed") / "speed.json"  # inside the results folder


def measure_speed(results: Path, variants: list[str], batch: int = 128, steps: int = 10,
                  rounds: int = 5) -> Path:
    """Training steps of every variant on one thread, interleaved, alone on the machine: clean images/s.

    A step is what `gcnet train` runs on a batch (channels_last per the config, cross-entropy,
    backward, gradient clipping, SGD) on random images, so data loading is left out. Each round
    times `steps` steps of every variant in turn; the result is each variant's median over rounds
    and the median of its per-round ratios to the baseline. Writes `results/speed/speed.json`.
    """
    import torch

    for name, value in (("batch", batch), ("steps", steps), ("rounds", rounds)):
        check_positive_int(name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = _time_steps(variants, batch, steps, rounds)
    finally:
        torch.set_num_threads(threads)
    speed = {
        v: {"images_per_s": statistics.median(steps * batch / t for t in times),
            "vs_baseline": statistics.median(t / b for t, b in zip(times, seconds[BASELINE]))}
        for v, times in seconds.items()
    }
    out = {"cpu": cpu_model(), "isa": cpu_isa(), "torch": torch.__version__, "threads": 1, "batch": batch,
           "steps": steps, "rounds": rounds, "measured": time.strftime("%Y-%m-%d %H:%M"), "variants": speed}
    path = results / SPEED
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(out, indent=2) + "\n"))
    return path


def _train_step(model: Any, optimizer: Any, images: Any, labels: Any, clip: float | None) -> Any:
    """One step as `gcnet train` runs it on a batch: cross-entropy, backward, clipping, the optimizer."""
    import torch
    import torch.nn.functional as F

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    return step


def _time_steps(variants: list[str], batch: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of `steps` training steps per variant and round (the baseline first); one warm-up round."""
    import torch

    from gcnet._machine import retain_freed_memory
    from gcnet.builder import build_model, build_optimizer
    from gcnet.config import load_config

    retain_freed_memory()  # as `gcnet train` does by default
    order = [BASELINE] + [v for v in variants if v != BASELINE]
    runs = {}
    for variant in order:
        config = load_config(CONFIG, overrides(model_settings(VARIANTS[variant])))
        layout = torch.channels_last if config.model.channels_last else torch.contiguous_format
        torch.manual_seed(0)
        model = build_model(config).train().to(memory_format=layout)
        optimizer = build_optimizer(model, config.optim)
        size = config.data.image_size
        images = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
        labels = torch.randint(0, config.model.num_classes or 10, (batch,))
        runs[variant] = _train_step(model, optimizer, images, labels, config.optim.grad_clip_norm)
    seconds: dict[str, list[float]] = {v: [] for v in order}
    for round_index in range(rounds + 1):  # round 0 warms up
        for variant, step in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if round_index:
                seconds[variant].append(time.perf_counter() - start)
    return seconds


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


def load_speed(results: Path) -> dict[str, dict[str, float]]:
    """{variant: {images_per_s, vs_baseline}} from `measure_speed`, or {} where it has not run."""
    path = results / SPEED
    return json.loads(path.read_text())["variants"] if path.is_file() else {}


def summary_table(results: dict[str, dict[int, dict[str, Any]]],
                  speed: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown table of the study: accuracy over seeds, paired difference from `none`, cost."""
    speed = speed or {}
    lines = ["| block | seeds | test top-1 (%) mean ± std | per seed | vs none (paired, 95% CI) | params "
             "| MMACs | train img/s in the runs (fastest epoch) | train img/s alone (step time vs none) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    base = {s: r["test_top1"] for s, r in results.get(BASELINE, {}).items()}
    for variant in VARIANTS:
        alone = speed.get(variant)
        alone_text = f"{alone['images_per_s']:.0f} ({alone['vs_baseline']:.2f}x)" if alone else ""
        runs = results.get(variant, {})
        if not runs:
            lines.append(f"| {variant} | 0 | not run yet | | | | | | {alone_text} |")
            continue
        accs = {s: r["test_top1"] for s, r in runs.items()}
        spread = f" ± {statistics.stdev(accs.values()):.2f}" if len(accs) > 1 else ""
        diff = paired_difference(accs, base) if variant != BASELINE else None
        shown = f"{diff[0]:+.2f} ± {diff[1]:.2f} (n={diff[2]})" if diff else ("-" if variant == BASELINE else "n < 2")
        first = next(iter(runs.values()))
        in_runs = statistics.mean(r["train_images_per_s"] for r in runs.values())
        lines.append(f"| {variant} | {len(accs)} | {statistics.mean(accs.values()):.2f}{spread} | "
                     f"{', '.join(f'{accs[s]:.2f}' for s in sorted(accs))} | {shown} | {first['parameters']:,} | "
                     f"{first['macs'] / 1e6:.2f} | {in_runs:.0f} | {alone_text} |")
    return "\n".join(lines)


def pairwise_table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Markdown matrix of paired differences, row minus column, with 95% t intervals over shared seeds.

    A `*` marks an interval that excludes zero; with k variants there are k(k-1)/2 comparisons, so
    about one in twenty such marks is expected by chance alone.
    """
    variants = [v for v in VARIANTS if results.get(v)]
    accs = {v: {s: r["test_top1"] for s, r in results[v].items()} for v in variants}
    lines = ["| row - column | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for a in variants:
        cells = []
        for b in variants:
            diff = paired_difference(accs[a], accs[b]) if a != b else None
            mark = "*" if diff and abs(diff[0]) > diff[1] else ""
            cells.append(f"{diff[0]:+.2f} ± {diff[1]:.2f}{mark}" if diff else "-")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
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
    fast = commands.add_parser("speed", help="training steps per second of every variant, interleaved, alone")
    fast.add_argument("--results", type=Path, default=Path("results/cifar10"))
    fast.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    fast.add_argument("--batch", type=int, default=128)
    fast.add_argument("--steps", type=int, default=10, help="steps per variant and round")
    fast.add_argument("--rounds", type=int, default=5)
    nl = commands.add_parser("nl", help="query statistics and NL -> SNL conversion of the finished NL runs")
    nl.add_argument("--results", type=Path, default=Path("results/cifar10"))
    nl.add_argument("--work", type=Path, default=Path("outputs/study"))
    nl.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    nl.add_argument("--batch-size", type=int, default=32, help="inputs per statistics/calibration batch")
    nl.add_argument("--latency-batch", type=int, default=128)
    nl.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="further config overrides for the fine-tuning run (smoke runs)")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.work, args.results, args.data, args.variants, args.seeds, args.epochs, args.parallel, args.extra)
    if args.command == "speed":
        print(measure_speed(args.results, args.variants, args.batch, args.steps, args.rounds))
    if args.command == "nl":
        for seed in args.seeds:
            done = (args.results / "conversion" / f"{run_name('nl', seed)}.json").is_file()
            path = None if done else convert_nl(args.work, args.results, seed, batch_size=args.batch_size,
                                                latency_batch=args.latency_batch, extra=args.extra)
            state = "already converted" if done else path or "not finished yet, or its kept weights are missing"
            print(run_name("nl", seed), state, flush=True)
        table = conversion_table(args.results)
        print(table)
        if (args.results / "conversion").is_dir():
            (args.results / "conversion" / "summary.md").write_text(table + "\n")
        return 0
    results = load_results(args.results)
    table = summary_table(results, load_speed(args.results))
    if results:
        table += "\n\nPaired differences of test top-1, row - column (95% t interval; * excludes zero):\n\n"
        table += pairwise_table(results)
    print(table)
    if results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "summary.md").write_text(table + "\n")
        summary_figure(results, args.results / "summary.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
