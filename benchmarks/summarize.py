"""Median and range over several runs of `benchmarks.blocks`: how docs/benchmarks.md states a target.

    python -m benchmarks.summarize docs/benchmarks/2026-12-05-amd-epyc-zen5-blocks.md
    python -m benchmarks.summarize run1.txt run2.txt run3.txt --each

One run's ratios move by up to ~0.1x (fwd) and ~0.6x (fwd+bwd) from run to run on a shared VM, so
the targets table gives the median of several runs and their range. This reads the printed output
of runs: files of one run each, or files of several under level-2 headings (as docs/benchmarks/
keeps them: "## Run 3, warm, new"). Runs are grouped by that heading without its "Run N, " prefix
(a file of one run: by its cache mode), and for each group and shape every ratio of the runs'
"Summary" tables is given as the median (min-max) over the runs; `--each` lists every run's value.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks._common import markdown_table

_RUN = re.compile(r"^Run \d+,?\s*")
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)x")


def sections(text: str) -> list[tuple[str, str]]:
    """(group, text) per run: level-2 headings split a file of runs; a file of one run is one. A run
    without a heading beyond "Run N" is grouped by its cache mode."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    titled = [("", text)] if len(parts) == 1 else list(zip(parts[1::2], parts[2::2]))
    return [(_RUN.sub("", title).strip() or cache_mode(body), body) for title, body in titled]


def cache_mode(text: str) -> str:
    """'warm' or 'cold', from the header benchmarks.blocks prints."""
    return "warm" if "cache mode: warm" in text or "caches: warm" in text else "cold"  # "caches:": older


def summary_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Header and rows of each table under a run's Summary heading (GC's, NL's; none if absent)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(r"#+ Summary", line.strip())), None)
    if start is None:
        return []
    tables, rows = [], []
    for line in [*lines[start + 1:], ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(rows) > 2:  # header, separator, rows
            tables.append((rows[0], rows[2:]))
        rows = []
        if line.strip():  # the summary ends at the first text that is not a table
            break
    return tables


Shapes = dict[str, dict[str, list[list[float]]]]  # shape -> column -> per run, the ratios of that cell


def ratios(cell: str) -> list[float]:
    """The ratios of a summary cell: "1.28x (1.22-1.35)" a median and its interval, "1.50x, 1.76x" two."""
    return [float(v) for v in _NUMBER.findall(re.sub(r"\(.*?\)", "", cell))]


def collect(texts: Iterable[str], parse: Callable[[str], list[float]] = ratios
            ) -> dict[tuple[str, tuple[str, ...]], Shapes]:
    """(group, table header) -> the values `parse` finds in each cell of every run in that group."""
    groups: dict[tuple[str, tuple[str, ...]], Shapes] = {}
    for text in texts:
        for group, body in sections(text):
            for header, rows in summary_tables(body):
                shapes = groups.setdefault((group, tuple(header)), {})
                for row in rows:
                    cells = shapes.setdefault(row[0], {})
                    for column, cell in zip(header[1:], row[1:]):
                        values = parse(cell)
                        if values:
                            cells.setdefault(column, []).append(values)
    return groups


def describe(runs: list[list[float]], each: bool) -> str:
    """'median (min-max)' per ratio of a cell over the runs, e.g. '1.28x (1.22-1.32)'."""
    texts = []
    for values in zip(*runs):
        text = f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"
        if each:
            text += " [" + " ".join(f"{v:.2f}" for v in values) + "]"
        texts.append(text)
    return ", ".join(texts)


def main(argv: list[str] | None = None) -> dict[str, list[list[str]]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="printed output of benchmarks.blocks runs")
    parser.add_argument("--each", action="store_true", help="also list every run's value")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_file()]
    if missing:
        raise SystemExit(f"benchmarks.summarize: no such file: {', '.join(missing)}")
    tables = {}
    for (group, header), shapes in collect(p.read_text() for p in args.paths).items():
        runs = max(len(r) for columns in shapes.values() for r in columns.values())
        rows = [[shape, *(describe(columns[c], args.each) if c in columns else "-" for c in header[1:])]
                for shape, columns in shapes.items()]
        tables[f"{group}: {header[1]}"] = rows
        print(f"#### {group} ({runs} run{'s' * (runs != 1)})\n")
        print(markdown_table(header, rows), "\n", flush=True)
    if not tables:
        raise SystemExit("benchmarks.summarize: no Summary table of benchmarks.blocks in " +
                         ", ".join(map(str, args.paths)))
    return tables


if __name__ == "__main__":
    main(sys.argv[1:])
