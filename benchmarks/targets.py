"""Issue 16's CPU targets on the machine at hand: every run they need, then a verdict per target.

    python -m benchmarks.targets --out docs/benchmarks/2026-12-05-amd-epyc-zen5-targets.md
    python -m benchmarks.targets --out runs.md --runs 3      # fewer rounds of runs

A round runs the GC suite of `benchmarks.blocks` with caches evicted and warm, its NL suite at the
two NL target shapes (peak memory in round 1 only) and `benchmarks.models` at batch 8, each in a
fresh process (under 3 minutes a round on 2 Zen 5 cores). Every run's output is added to `--out`
under "## Run i, <part>" as it ends (atomically); started again with the same `--out`, the script
skips the runs already there, so a session that ends mid-way loses nothing (one machine per file:
another machine's file is refused). The verdicts take the median and range over the rounds, per
cache mode, as docs/benchmarks.md states its targets ("met": the median meets the target).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import blocks, summarize
from benchmarks._common import environment, markdown_table, run_script
from benchmarks.blocks import shape_name
from gcnet.engine.checkpoint import atomic_write

PARTS = ("cold, gc", "warm, gc", "cold, nl", "models")
NL_SHAPES = ("2x256x64x64", "1x64x128x128")
TARGET_SHAPES = ("32x256x56x56", "32x1024x14x14")
GC_SHAPES = tuple(shape_name(shape) for shape in blocks.GC_SHAPES[False])  # kernels vs ops: every one


@dataclass(frozen=True)
class Target:
    """A bound on one ratio of a summary table: `column` (its `value`-th number) at `shapes`."""

    name: str
    part: str  # "gc" or "nl" (the blocks summaries, per cache mode) or "models"
    column: str
    shapes: tuple[str, ...]
    limit: float
    at_most: bool = True
    value: int = 0


TARGETS = (
    Target("GC fwd <= 1.3x floor", "gc", "GC fwd / floor", TARGET_SHAPES, 1.3),
    Target("GC fwd+bwd <= 3x floor fwd", "gc", "GC fwd+bwd / floor fwd", TARGET_SHAPES, 3.0),
    Target("GC fwd+bwd >= 3x faster than timm", "gc", "timm fwd+bwd / GC", TARGET_SHAPES, 3.0, at_most=False),
    Target("CPU kernels never slower than PyTorch ops, fwd", "gc", "kernels vs PyTorch ops fwd, fwd+bwd",
           GC_SHAPES, 1.0, at_most=False),
    Target("CPU kernels never slower than PyTorch ops, fwd+bwd", "gc", "kernels vs PyTorch ops fwd, fwd+bwd",
           GC_SHAPES, 1.0, at_most=False, value=1),
    Target("SE fwd+bwd <= 3.5x floor fwd", "gc", "SE fwd+bwd / floor fwd", TARGET_SHAPES, 3.5),
    Target("NL fwd >= 2x faster than naive", "nl", "naive fwd / NL", ("2x256x64x64",), 2.0, at_most=False),
    Target("NL fwd peak <= 5% of naive", "nl", "NL peak fwd, fwd+bwd (% of naive)", ("1x64x128x128",), 5.0),
    Target("NL fwd+bwd peak <= 5% of naive", "nl", "NL peak fwd, fwd+bwd (% of naive)", ("1x64x128x128",),
           5.0, value=1),
    Target("R50 + GC r16 (c3-c5) inference <= 1.03x R50", "models", "inference", ("batch 8",), 1.03),
    Target("R50 + GC r16 (c3-c5) train step <= 1.05x R50", "models", "train", ("batch 8",), 1.05),
)

_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)%\)")


def run_plan(rounds: int, quick: bool) -> list[tuple[str, str, list[str]]]:
    """(heading, module, arguments) of every run, round by round; NL's peak memory in round 1 only.
    `quick`: each script's smoke run (its own tiny shapes, no memory)."""
    plan = []
    for index in range(1, rounds + 1):
        for part in PARTS:
            if part == "models":
                plan.append((f"Run {index}, {part}", "benchmarks.models",
                             ["--quick"] if quick else ["--batch", "8", "--rounds", "15"]))
                continue
            mode, suite = part.split(", ")
            args = ["--suite", suite] + (["--warm-cache"] if mode == "warm" else [])
            if quick:
                args += ["--quick", "--no-memory"]
            elif suite == "nl":
                args += [a for shape in NL_SHAPES for a in ("--shape", shape)] + ["--no-memory"] * (index > 1)
            else:
                args += ["--no-memory"]
            plan.append((f"Run {index}, {part}", "benchmarks.blocks", args))
    return plan


MACHINE_KEYS = ("cpu", "isa", "caches")


def this_machine() -> str:
    """CPU model, ISA and caches as the benchmark headers print them."""
    info = environment()
    return " | ".join(f"{key}: {info[key]}" for key in MACHINE_KEYS)


def recorded_machine(text: str) -> str | None:
    """The machine of the first run in `text` (its header line), or None before any run."""
    for line in text.splitlines():
        if line.startswith("cpu: "):
            fields = dict(part.split(": ", 1) for part in line.split(" | ") if ": " in part)
            return " | ".join(f"{key}: {fields.get(key, '?')}" for key in MACHINE_KEYS)
    return None


def cell_values(cell: str) -> list[float]:
    """The percentages of a summary cell (NL's peaks: "74 MiB (3.6%), ..."), else its ratios."""
    return [float(v) for v in _PERCENT.findall(cell)] or summarize.ratios(cell)


def blocks_values(text: str) -> dict[tuple[str, str, str], list[list[float]]]:
    """(cache mode and suite, column, shape) -> each run's values, from the runs' summary tables."""
    return {(group, column, shape): runs
            for (group, _), shapes in summarize.collect([text], cell_values).items()
            for shape, columns in shapes.items() for column, runs in columns.items()}


def models_values(text: str) -> dict[str, list[float]]:
    """"train" / "inference" -> each run's ratio of ResNet-50 + GC r16 to ResNet-50."""
    found: dict[str, list[float]] = {"train": [], "inference": []}
    for line in text.splitlines():
        if line.startswith("| ResNet-50 + GC r16"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            found["train"].append(summarize.ratios(cells[3])[0])
            found["inference"].append(summarize.ratios(cells[5])[0])
    return found


def verdicts(text: str) -> list[list[str]]:
    """One row per target, cache mode and shape: median (range) over the runs, runs meeting it, met."""
    suites, models = blocks_values(text), models_values(text)
    rows = []
    for target in TARGETS:
        modes = ("cold", "warm") if target.part == "gc" else ("cold",) if target.part == "nl" else ("",)
        for mode in modes:
            for shape in target.shapes:
                if target.part == "models":
                    values = models[target.column]
                else:
                    runs = suites.get((f"{mode}, {target.part}", target.column, shape), [])
                    values = [run[target.value] for run in runs if len(run) > target.value]
                if not values:
                    rows.append([target.name, mode or "-", shape, "not measured", "-", "-"])
                    continue

                def meets(v: float, target: Target = target) -> bool:
                    return v <= target.limit if target.at_most else v >= target.limit

                unit = "%" if "%" in target.column else "x"
                median = statistics.median(values)
                rows.append([target.name, mode or "-", shape,
                             f"{median:.2f}{unit} ({min(values):.2f}-{max(values):.2f})",
                             f"{sum(map(meets, values))} of {len(values)}", "yes" if meets(median) else "no"])
    return rows


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="markdown file for every run's output")
    parser.add_argument("--runs", type=int, default=5, help="rounds of runs (default 5)")
    parser.add_argument("--quick", action="store_true", help="every script's smoke run (tiny shapes)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every run (default 2)")
    parser.add_argument("--system-allocator", action="store_true", help="passed on to every run")
    args = parser.parse_args(argv)
    if args.runs < 1:
        raise SystemExit(f"benchmarks.targets: expected --runs >= 1, got {args.runs}")
    args.extra = ["--threads", str(args.threads)] + ["--system-allocator"] * args.system_allocator
    text = args.out.read_text() if args.out.is_file() else (
        f"# Issue 16's targets: `python -m benchmarks.targets --runs {args.runs}`\n")
    here, before = this_machine(), recorded_machine(text)
    if before is not None and before != here:
        raise SystemExit(f"benchmarks.targets: {args.out} holds runs of another machine ({before}); "
                         f"this is {here}: give another --out")
    done = set(re.findall(r"^## (.+)$", text, flags=re.MULTILINE))
    for heading, module, script_args in run_plan(args.runs, args.quick):
        if heading in done:
            continue
        output = run_script(module, script_args + args.extra, "benchmarks.targets")
        text += f"\n## {heading}\n\n{output}"
        atomic_write(args.out, lambda tmp, text=text: tmp.write_text(text))
        print(f"{heading}: done", flush=True)
    rows = verdicts(text)
    print(markdown_table(["target", "caches", "shape", "median (range)", "runs meeting it", "met"], rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
