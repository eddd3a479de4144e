"""Alternate runs of `benchmarks.blocks` on this checkout's gcnet and another commit's, to tell a change
from the run-to-run spread.

    python -m benchmarks.compare a8cccd3 --out runs.md                         # 5 runs per side and mode
    python -m benchmarks.compare HEAD~1 --runs 3 --out runs.md -- --shape 32x1024x14x14

On a shared VM one run's ratios move by up to ~0.1x (fwd) and ~0.6x (fwd+bwd), so a change shows
only against runs of the commit before it taken in the same minutes. The other side is REV's
`src/gcnet` (its Python and its `gcnet._C`, built in a git worktree) under this checkout's
benchmark scripts, so that only the library differs. Each round runs both sides cold and with
`--warm-cache` (arguments after `--` go to benchmarks.blocks; default `--suite gc --no-memory
--rounds 15`); every run's output is added to `--out` under "## Run i, mode, side" as it ends, and
`benchmarks.summarize` then prints the median (range) of each ratio per mode and side.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import summarize
from benchmarks._common import run_script
from gcnet.engine.checkpoint import atomic_write

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARGS = ["--suite", "gc", "--no-memory", "--rounds", "15"]


def checkout(rev: str, into: Path, build: bool) -> Path:
    """REV's tree in a detached git worktree at `into`, its kernels built there unless `build` is
    False (then REV runs without them); returns its `src` folder."""
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.compare: cannot check out {rev!r}: {done.stderr.strip()}")
    if build:
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into, check=True,
                       stdout=subprocess.DEVNULL)
        if not list((into / "src" / "gcnet").glob("_C*.so")):
            raise SystemExit(f"benchmarks.compare: {rev}'s CPU kernels did not build (`setup.py build_ext`)")
    return into / "src"


def main(argv: list[str] | None = None) -> dict[str, list[list[str]]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    blocks_args = DEFAULT_ARGS
    if "--" in argv:
        index = argv.index("--")
        argv, blocks_args = argv[:index], argv[index + 1:]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rev", help="the other side: a commit, tag or branch of this repository")
    parser.add_argument("--out", type=Path, required=True, help="markdown file for every run's output")
    parser.add_argument("--runs", type=int, default=5, help="rounds of runs (default 5)")
    parser.add_argument("--modes", default="cold,warm", help="cache modes, comma-separated (default both)")
    parser.add_argument("--no-build", action="store_true", help="run REV without its CPU kernels")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if args.runs < 1 or not modes or not set(modes) <= {"cold", "warm"}:
        raise SystemExit("benchmarks.compare: expected --runs >= 1 and --modes from cold,warm")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or "this checkout"
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                             capture_output=True, text=True, check=False).stdout.strip()
    if changed:
        head += " + changes in src"  # the library under test is not that commit's
    scratch = Path(tempfile.mkdtemp(prefix="gcnet-compare-"))
    tree = scratch / "tree"
    try:
        sides = {f"this ({head})": ROOT / "src", args.rev: checkout(args.rev, tree, not args.no_build)}
        text = (f"# benchmarks.blocks {' '.join(blocks_args)}: this checkout ({head}) against {args.rev}\n\n"
                f"`python -m benchmarks.compare {args.rev} --runs {args.runs} --modes {','.join(modes)}`; "
                "the sides alternate within each round.\n")
        for index in range(1, args.runs + 1):
            for mode in modes:
                for side, src in sides.items():
                    mode_args = blocks_args + (["--warm-cache"] if mode == "warm" else [])
                    output = run_script("benchmarks.blocks", mode_args, "benchmarks.compare", str(src))
                    text += f"\n## Run {index}, {mode}, {side}\n\n{output}"
                    atomic_write(args.out, lambda tmp, text=text: tmp.write_text(text))  # each run kept
                    print(f"run {index}, {mode}, {side}: done", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return summarize.main([str(args.out)])


if __name__ == "__main__":
    main()
