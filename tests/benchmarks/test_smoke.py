"""Smoke runs of the benchmark scripts' quick modes: every case runs and reports; no speed assertions."""

import json
import platform
import re
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import (
    _common,
    attention_blocks,
    blocks,
    compare,
    gc_breakdown,
    models,
    pool_blocks,
    summarize,
)
from gcnet.blocks import GlobalContext

# The test processes keep glibc's default allocator: --system-allocator leaves malloc as it is.


def test_block_benchmarks_report_every_case() -> None:
    results = blocks.main(["--quick", "--threads", "1", "--no-memory", "--system-allocator"])
    assert {r["suite"] for r in results} == {"gc", "nl"}
    for result in results:
        names = [row["case"] for row in result["rows"]]
        if result["suite"] == "gc":
            assert names[0].startswith("floor") and "gcnet GC r16 (add)" in names
        else:
            nl_rows = {"gcnet NL", "naive NL (N x N bmm)", "gcnet NL, oneDNN products",
                       "gcnet NL, MKL products (bmm, SDPA)"}
            assert nl_rows <= set(names)
        assert all(row["fwd_ms"] > 0 and row["fb_ms"] > 0 for row in result["rows"])
        # The cases sharing weights (gcnet, its composite path, naive, timm) compute the same function.
        assert result["max_abs_diff"] < 1e-4
    summary = blocks.format_summary(results)  # one row of target ratios per shape
    assert all(f"| {result['shape']} | " in summary for result in results)


def test_block_benchmarks_run_in_channels_last(capsys: pytest.CaptureFixture[str]) -> None:
    x, grad = blocks.make_inputs((2, 8, 2, 4, 4), channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last_3d) and x.requires_grad
    assert grad.is_contiguous(memory_format=torch.channels_last_3d) and not grad.is_contiguous()
    results = blocks.main(["--quick", "--suite", "gc", "--channels-last", "--threads", "1", "--no-memory",
                           "--system-allocator"])
    assert "layout: channels_last |" in capsys.readouterr().out
    assert [r["shape"] for r in results] == ["4x32x16x16", "2x64x2x4x4"]
    assert all(r["max_abs_diff"] < 1e-4 and all(row["fb_ms"] > 0 for row in r["rows"]) for r in results)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_peak_memory_is_measured_in_a_fresh_process(layout: str) -> None:
    spec = f"gc:2x32x8x8:{layout}:gcnet GC r16 (add):fb"
    command = [sys.executable, "-m", "benchmarks.blocks", "--threads", "1", "--memory-case", spec]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1])["peak_mib"] >= 0


def test_model_benchmark_reports_each_model() -> None:
    result = models.main(["--quick", "--threads", "1", "--system-allocator", "--composite"])
    composite = [f"{name}, composite" for name in list(models.MODELS)[1:]]
    assert [row["model"] for row in result["rows"]] == list(models.MODELS) + composite
    assert all(row["train_ms"] > 0 and row["infer_ms"] > 0 for row in result["rows"])
    assert result["rows"][0]["train_block_share"] is None
    assert all(0 < row["train_block_share"] < 1 for row in result["rows"][1:3])


def test_model_benchmark_on_clips_in_channels_last_3d() -> None:
    result = models.main(["--quick", "--video", "--channels-last", "--rounds", "1", "--threads", "1",
                          "--system-allocator"])
    assert [row["model"] for row in result["rows"]] == list(models.VIDEO_MODELS)
    assert result["layout"] == "channels_last_3d" and all(row["train_ms"] > 0 for row in result["rows"])
    assert all(0 < row["train_block_share"] < 1 for row in result["rows"][1:])


class _Sleep(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.03)
        return x


class _SlowContext(GlobalContext):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.03)
        return super().forward(x)


def test_block_clock_counts_the_time_inside_the_blocks_only() -> None:
    model = torch.nn.Sequential(_Sleep(), _SlowContext(8, reduction=4))
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    clock = models.BlockClock(model)
    share = clock.share(lambda: model(x).sum().backward(), rounds=3)
    clock.remove()
    assert 0.3 < share < 0.85  # half of each step sleeps inside the block, half outside
    last = clock.seconds
    model(x).sum().backward()
    assert clock.seconds == last  # the hooks are gone
    with pytest.raises(ValueError, match="no context block"):
        models.BlockClock(torch.nn.Linear(2, 2))


def test_attention_block_benchmark_times_each_size_and_restores_the_choice() -> None:
    from gcnet.blocks import _fused

    chosen = _fused.attention_blocks
    rows = attention_blocks.main(["--quick", "--threads", "1", "--system-allocator"])
    assert {row[0] for row in rows} == {32, 64} and sum("(chosen)" in row[1] for row in rows) == 2
    assert all(float(row[3]) > 0 for row in rows) and _fused.attention_blocks is chosen


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_retained_heap_settings() -> None:
    """mallopt takes both settings (run in a fresh process: the test workers keep their allocator).

    Whether a freed buffer is then reused without page faults is not asserted: it held in most
    runs but not all (the heap can grow through mmap when brk cannot extend it).
    """
    code = "from benchmarks._common import retain_freed_memory\nprint(retain_freed_memory())\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_cache_eviction_runs_before_every_timed_call() -> None:
    order: list[str] = []
    evict = _common.CacheEviction(1)
    assert evict.buffer.numel() * evict.buffer.element_size() == 2**20

    def before_each() -> None:
        evict()
        order.append("evict")

    timings = _common.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2, 1, before_each)
    assert order == ["evict", "a", "evict", "b"] * 3
    assert len(timings["a"].seconds) == 2
    assert _common.CacheEviction(0).buffer is None
    order.clear()
    _common.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 1, 0, before_each,
                        setups={"b": lambda: order.append("setup b")})
    assert order == ["evict", "a", "setup b", "evict", "b"]  # the setup before the eviction, untimed


def test_block_ratios_are_taken_within_each_round() -> None:
    """A slow round of one case moves a ratio of medians (3.0 / 2.0) but not the per-round ratios."""
    floor = {"case": "floor", "fwd_s": [1.0, 3.0, 2.0], "fb_s": [2.0, 6.0, 4.0]}
    block = {"case": "block", "fwd_s": [3.0, 3.3, 2.2], "fb_s": [4.0, 12.0, 8.0]}
    assert blocks.paired(block, "fwd", floor, "fwd")[0] == pytest.approx(1.1)
    assert blocks.paired(block, "fb", floor, "fwd")[0] == pytest.approx(4.0)
    assert blocks.paired_text(block, "fb", floor, "fb", interval=True) == "2.00x (2.00-2.00)"
    case = blocks.Case(torch.nn.Identity(), torch.zeros(2, requires_grad=True), torch.ones(2))
    calls = []

    def wrap(run):  # as cuda_blocks wraps each call with a device synchronisation
        return lambda: (calls.append(run.__name__), run())

    modes = []
    case.module.register_forward_hook(lambda module, args, out: modes.append(module.training))
    rows = blocks.time_cases({"a": case}, 3, 1, wrap=wrap)
    assert len(rows[0]["fwd_s"]) == len(rows[0]["fb_s"]) == 3
    assert calls == ["forward", "forward_backward"] * 4  # forward and backward alternate in every round
    assert modes == [False, True] * 4  # each in its mode, set untimed before the call


def test_eviction_buffer_outgrows_the_last_level_cache() -> None:
    llc = _common.last_level_cache_bytes()
    mib = _common.CacheEviction.mib_for_this_machine()
    assert mib >= 64
    if llc is not None:
        assert mib * 2**20 >= 2 * llc


def test_the_header_names_the_machine() -> None:
    info = _common.environment()
    assert info["isa"] == torch.backends.cpu.get_cpu_capability() and info["isa"]
    if platform.system() == "Linux":
        assert "L1d" in info["caches"] or info["caches"] == "unknown"
    assert "logical cores" in info["cpu"]
    if platform.machine() == "x86_64" and platform.system() == "Linux":  # family and model tell Zen 3 from 5
        assert re.search(r"\(family \d+, model \d+\)", info["cpu"]), info["cpu"]
    from gcnet.blocks import _fused

    kernels = info["gcnet CPU kernels"]
    if _fused.native_kernels_available():  # which code the build holds (GCNET_KERNEL_ISA=avx2: AVX2's only)
        assert kernels == f"built for {_fused._native.built_for}", kernels
        assert _fused._native.built_for in {"x86-64-v4, v3 and baseline clones", "x86-64-v3 only",
                                            "the compiler's default"}
    else:
        assert kernels.startswith("not built")


def test_allocator_benchmark_runs_each_allocator_in_its_own_process() -> None:
    """A child process per allocator, checked to run on the allocator it is named for (LD_PRELOAD)."""
    import argparse
    from pathlib import Path

    from benchmarks import allocators

    args = argparse.Namespace(threads=1, steps=1, warmup=1, quick=True)
    case = next(iter(allocators.CASES))
    names = ["glibc retained"] + [a for a, lib in allocators.LIBRARIES.items() if Path(lib).is_file()]
    for name in names:
        assert allocators.run_child(case, name, args) > 0


def test_median_interval_takes_the_binomial_order_statistics() -> None:
    from benchmarks._common import median_interval

    assert median_interval([float(v) for v in range(15, 0, -1)]) == (8.0, 4.0, 12.0)
    assert median_interval([2.0, 1.0, 3.0]) == (2.0, 1.0, 3.0)  # too few rounds: the whole range


def test_gc_breakdown_times_every_kernel_of_a_step() -> None:
    from gcnet.blocks import _fused

    results = gc_breakdown.main(["--shape", "4x32x6x6", "--steps", "2", "--threads", "1"])
    if not _fused.native_kernels_available():
        assert results == {}
        return
    names = [row[0] for row in results["4x32x6x6"]]
    assert names[:3] == ["floor forward", "block forward", "block backward"]
    assert {"kernel attention_pool", "kernel attention_pool_backward"} <= set(names)
    rows = {row[0]: row[2] for row in results["4x32x6x6"]}
    # The transforms run as kernels (their rows above), so their small graph is not timed again.
    assert {"kernel transform_forward", "kernel transform_backward"} <= set(names)
    assert "transforms (B, C), forward + backward" not in names
    kernels = [name for name in names if name.startswith("kernel ")]
    parts = [*kernels, "fusion: x + add term", "grad_out summed over positions"]
    bound = float(rows["sum of the parts alone (lower bound)"])
    # Every row, the bound's too, is rounded to 0.01 ms: each rounding moves the sum by at most 0.005.
    rounding = 0.005 * (len(parts) + 1)
    assert bound == pytest.approx(sum(float(rows[name]) for name in parts), abs=rounding + 1e-9)
    assert rows["  the same / floor forward alone"].endswith("x")
    assert float(rows["transforms forward, right after a sum over x"]) >= 0  # ~0.01 ms: may round to 0
    assert "x + grad_out, one pass (the pooling backward's memory floor)" in rows
    fixed = "block fwd+bwd at 4x32x2x2, after a sum over x (the part that does not scale with x)"
    assert float(rows[fixed]) > 0
    assert float(rows["block fwd (eval) at 4x32x2x2, caches evicted"]) > 0
    assert float(rows["block fwd+bwd at 4x32x2x2, caches evicted"]) > 0
    assert float(rows["the step's kernels and ops called directly in order, caches evicted"]) > 0
    assert float(rows["  the same / floor forward (within rounds)"].rstrip("x")) > 0
    assert _fused._native is not None and not isinstance(_fused._native, gc_breakdown._Timed)


def test_pool_block_benchmark_times_both_kernels_against_one_pass() -> None:
    from gcnet.blocks import _fused

    rows = pool_blocks.main(["--quick", "--threads", "1", "--system-allocator"])
    if not _fused.native_kernels_available():
        assert rows == []
        return
    for shape in ("4x32x16x16", "2x64x2x4x4"):
        for kernel, one_pass in (("forward", "x.sum"), ("backward", "x + grad_out")):
            mine = [row for row in rows if row[:2] == [shape, kernel]]
            assert mine[0][2] == one_pass and any("the rule's" in row[2] for row in mine[1:])
            assert any("whole samples" in row[2] for row in mine[1:])
            assert all(float(row[4]) > 0 and float(row[6]) > 0 for row in mine)
            assert all(row[5].endswith("x") and row[7].endswith("x") for row in mine[1:])


def _run_output(mode: str, fwd: str, speedups: str, key: str = "cache mode") -> str:
    return (f"cpu: test | caches: L1d 48K, L3 32768K | {key}: {mode} | threads: 1\n\n#### Summary\n\n"
            "| shape | GC fwd / floor | kernels vs PyTorch ops fwd, fwd+bwd |\n|---|---|---|\n"
            f"| 4x8x6x6 | {fwd} (1.00-9.00) | {speedups} |\n\n"
            "| shape | naive fwd / NL |\n|---|---|\n| 1x8x4x4 | 2.00x |\n")


def test_summarize_gives_the_median_and_range_of_each_ratio_over_runs(tmp_path, capsys) -> None:
    runs = tmp_path / "runs.md"
    runs.write_text("# Runs\n\n" + "".join(
        f"## Run {i}, cold, new\n\n" + _run_output("evicted before each call", fwd, speedups)
        for i, (fwd, speedups) in enumerate([("1.10x", "1.50x, 2.00x"), ("1.30x", "1.70x, 1.00x"),
                                             ("1.20x", "1.60x, 3.00x")], start=1)))
    single = tmp_path / "one.txt"  # a file of one run: grouped by its cache mode
    single.write_text(_run_output("warm (x read before each)", "1.40x", "1.10x, 1.20x"))
    before = tmp_path / "before-12-05.txt"  # the mode was printed as "caches", without their sizes
    before.write_text(_run_output("warm (x read before each)", "1.20x", "1.10x, 1.20x").replace(
        "caches: L1d 48K, L3 32768K | cache mode:", "caches:"))
    tables = summarize.main([str(runs), str(single), str(before), "--each"])
    assert tables["cold, new: GC fwd / floor"] == [
        ["4x8x6x6", "1.20x (1.10-1.30) [1.10 1.30 1.20]",
         "1.60x (1.50-1.70) [1.50 1.70 1.60], 2.00x (1.00-3.00) [2.00 1.00 3.00]"]]
    assert tables["cold, new: naive fwd / NL"] == [["1x8x4x4", "2.00x (2.00-2.00) [2.00 2.00 2.00]"]]
    assert tables["warm: GC fwd / floor"][0][1] == "1.30x (1.20-1.40) [1.40 1.20]"
    assert "#### cold, new (3 runs)" in capsys.readouterr().out
    empty = tmp_path / "empty.md"
    empty.write_text("## Run 1, cold\n\nno table here\n")
    with pytest.raises(SystemExit, match="no Summary table"):
        summarize.main([str(empty)])
    with pytest.raises(SystemExit, match="no such file"):
        summarize.main([str(tmp_path / "missing.md")])


def test_compare_alternates_this_checkout_and_another_commit(tmp_path, capsys) -> None:
    out = tmp_path / "runs.md"
    tables = compare.main(["HEAD", "--out", str(out), "--runs", "2", "--modes", "cold", "--no-build", "--",
                           "--quick", "--suite", "gc", "--no-memory", "--threads", "1", "--system-allocator"])
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    this = next(h for h in headings if "this" in h)[len("## Run 1, cold, "):]
    assert headings == [f"## Run 1, cold, {this}", "## Run 1, cold, HEAD", f"## Run 2, cold, {this}",
                        "## Run 2, cold, HEAD"]
    assert "gcnet CPU kernels: not built" in text.split("## Run 1, cold, HEAD")[1].split("## Run 2")[0]
    assert {f"cold, {this}: GC fwd / floor", "cold, HEAD: GC fwd / floor"} <= set(tables)
    assert "(2 runs)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot check out"):
        compare.main(["no-such-commit", "--out", str(out), "--runs", "1"])
