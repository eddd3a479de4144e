"""benchmarks.targets: the runs it makes and resumes, and the verdicts it reads from their output."""

import pytest

from benchmarks import targets


def summary(shape: str, fwd: float, fb: float, kernels: tuple[float, float]) -> str:
    """A GC summary table as benchmarks.blocks prints it, with the ratios given."""
    return (
        "#### Summary\n\n| shape | GC fwd / floor | GC fwd+bwd / floor fwd | kernels vs PyTorch ops fwd,"
        " fwd+bwd | timm fwd+bwd / GC | SE fwd+bwd / floor fwd | SE kernels vs PyTorch ops fwd+bwd |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {shape} | {fwd:.2f}x ({fwd - 0.1:.2f}-{fwd + 0.1:.2f}) | {fb:.2f}x (1.00-9.00) | "
        f"{kernels[0]:.2f}x, {kernels[1]:.2f}x | 4.00x | 2.50x (2.00-3.00) | 1.50x |\n"
    )


def test_verdicts_take_the_median_and_range_of_the_runs_per_cache_mode() -> None:
    text = "# runs\n"
    for index, (fwd, fb) in enumerate([(1.2, 3.1), (1.4, 2.9), (1.25, 3.5)], start=1):
        text += f"\n## Run {index}, cold, gc\n\nheader\n\n{summary('32x1024x14x14', fwd, fb, (1.3, 0.9))}"
    text += "\n## Run 1, warm, gc\n\n" + summary("32x1024x14x14", 1.5, 2.0, (1.1, 1.2))
    text += ("\n## Run 1, cold, nl\n\n#### Summary\n\n| shape | naive fwd / NL | naive fwd+bwd / NL | "
             "NL peak fwd, fwd+bwd (% of naive) | MKL / oneDNN products, NL fwd, fwd+bwd |\n"
             "|---|---|---|---|---|\n"
             "| 1x64x128x128 | 8.08x | 2.90x | 74 MiB (3.6%), 78 MiB (5.5%) | 1.13x, 1.13x |\n")
    text += ("\n## Run 1, models\n\n| model | params | train step ms | vs ResNet-50 (95%) | inference ms | "
             "vs ResNet-50 (95%) | in blocks, train / inference |\n|---|---|---|---|---|---|---|\n"
             "| ResNet-50 + GC r16 (c3-c5) | 28.08M | 777.6 | 1.06x (0.90-1.25) | 219.0 | 1.02x (1.00-1.03)"
             " | - |\n")
    rows = {(r[0], r[1], r[2]): r[3:] for r in targets.verdicts(text)}
    assert rows["GC fwd <= 1.3x floor", "cold", "32x1024x14x14"] == ["1.25x (1.20-1.40)", "2 of 3", "yes"]
    assert rows["GC fwd <= 1.3x floor", "warm", "32x1024x14x14"] == ["1.50x (1.50-1.50)", "0 of 1", "no"]
    fb = rows["GC fwd+bwd <= 3x floor fwd", "cold", "32x1024x14x14"]
    assert fb == ["3.10x (2.90-3.50)", "1 of 3", "no"]
    fb_kernels = ("CPU kernels never slower than PyTorch ops, fwd+bwd", "cold", "32x1024x14x14")
    assert rows[fb_kernels] == ["0.90x (0.90-0.90)", "0 of 3", "no"]  # the cell's second ratio
    assert rows["GC fwd <= 1.3x floor", "cold", "32x256x56x56"] == ["not measured", "-", "-"]
    nl_peak = rows["NL fwd peak <= 5% of naive", "cold", "1x64x128x128"]
    assert nl_peak == ["3.60% (3.60-3.60)", "1 of 1", "yes"]
    assert rows["NL fwd+bwd peak <= 5% of naive", "cold", "1x64x128x128"][2] == "no"
    assert rows["R50 + GC r16 (c3-c5) train step <= 1.05x R50", "-", "batch 8"][2] == "no"
    assert rows["R50 + GC r16 (c3-c5) inference <= 1.03x R50", "-", "batch 8"][2] == "yes"


def test_runs_are_kept_as_they_end_and_a_second_start_makes_only_the_missing_ones(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, calls = tmp_path / "runs.md", []

    def fake(module: str, args: list[str], caller: str) -> str:
        calls.append((module, args))
        if len(calls) == 3:
            raise SystemExit("interrupted")
        return f"output of {module}\n"

    monkeypatch.setattr(targets, "run_script", fake)
    monkeypatch.setattr(targets, "this_machine", lambda: "cpu: A | isa: AVX2 | caches: L2 512K")
    with pytest.raises(SystemExit, match="interrupted"):
        targets.main(["--out", str(out), "--runs", "2"])
    assert out.read_text().count("## Run 1, ") == 2  # the two runs that ended
    calls.clear()
    monkeypatch.setattr(targets, "run_script", lambda module, args, caller: calls.append(args) or "done\n")
    targets.main(["--out", str(out), "--runs", "2"])
    assert len(calls) == 2 * len(targets.PARTS) - 2
    headings = [line for line in out.read_text().splitlines() if line.startswith("## ")]
    assert headings == [f"## Run {i}, {part}" for i in (1, 2) for part in targets.PARTS]
    header = "cpu: B (2 logical cores) | isa: AVX512 | caches: L2 2048K | python: 3.11"
    out.write_text(out.read_text().replace("done", header, 1))
    with pytest.raises(SystemExit, match=r"another machine \(cpu: B \(2 logical cores\) \| isa: AVX512"):
        targets.main(["--out", str(out), "--runs", "3"])  # a third round, but the file is another machine's
    nl = [args for args in calls if "nl" in args]
    assert "--no-memory" not in nl[0] and "--no-memory" in nl[1]  # peak memory in round 1 only
    assert all(args[-2:] == ["--threads", "2"] for args in calls)


def test_quick_run_reads_every_script_output() -> None:
    plan = targets.run_plan(1, quick=True)
    assert [heading for heading, _, _ in plan] == [f"Run 1, {part}" for part in targets.PARTS]
    text = ""
    for heading, module, args in plan:
        args += ["--threads", "1", "--system-allocator"]
        text += f"\n## {heading}\n\n" + targets.run_script(module, args, "test")
    found = targets.blocks_values(text)
    assert {group for group, _, _ in found} == {"cold, gc", "warm, gc", "cold, nl"}
    assert all(len(runs) == 1 for runs in found.values())
    assert {key: len(values) for key, values in targets.models_values(text).items()} == {
        "train": 1, "inference": 1}
    with pytest.raises(SystemExit, match="--runs >= 1"):
        targets.main(["--out", "unused.md", "--runs", "0"])
