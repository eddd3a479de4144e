"""The CIFAR-10 study: runs write one JSON each, a second sitting skips them, the summary pairs seeds."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from gcnet.study import (load_results, load_speed, main, paired_difference, pairwise_table,
                         summary_table)
from tests.engine.tiny import make_image_folder

SMOKE = ["data.batch_size=8", "data.eval_batch_size=16", "data.workers=0", "data.val_fraction=0.25",
         "train.max_steps_per_epoch=2", "train.checkpoint_every_steps=0", "train.plot=false"]


def test_grid_writes_results_a_later_sitting_skips_them_and_nl_runs_convert(tmp_path: Path) -> None:
    data = tmp_path / "cifar"
    for split in ("train", "test"):
        make_image_folder(data / split, classes=3, per_class=8, size=32)
    results, work = tmp_path / "results", tmp_path / "work"
    smoke = [a for o in SMOKE for a in ("--set", o)]
    argv = ["run", "--results", str(results), "--work", str(work), "--data", str(data), "--epochs", "1",
            "--seeds", "0", "1", "--variants", "none", "nl", *smoke]
    assert main(argv) == 0
    assert sorted(p.name for p in results.glob("*_seed*.json")) == [
        "nl_seed0.json", "nl_seed1.json", "none_seed0.json", "none_seed1.json"]
    result = json.loads((results / "nl_seed1.json").read_text())
    assert result["seed"] == 1 and result["parameters"] > 269_722 and 0 <= result["test_top1"] <= 100
    assert result["test_images"] == 24 and result["epochs"] == 1
    stamp = (results / "none_seed0.json").stat().st_mtime_ns
    assert main(argv) == 0  # nothing left to run
    assert (results / "none_seed0.json").stat().st_mtime_ns == stamp
    table = (results / "summary.md").read_text()
    assert "| nl | 2 |" in table and "(n=2)" in table and "| snl | 0 | not run yet |" in table
    assert (results / "summary.png").stat().st_size > 5_000
    kept = sorted(p.name for p in (results / "checkpoints").iterdir())
    assert kept == ["nl_seed0", "nl_seed1"]  # only the NL runs keep their weights, without optimizer state
    assert "optimizer" not in torch.load(results / "checkpoints" / "nl_seed0" / "state.pt", weights_only=True)

    # The NL runs: query statistics, conversion to SNL, one fine-tuning epoch, latency, from the
    # results folder alone (the work folder stayed on another machine).
    shutil.rmtree(work)
    argv = ["nl", "--results", str(results), "--work", str(work), "--seeds", "0", "2", "--batch-size", "8",
            "--latency-batch", "4", *smoke]
    assert main(argv) == 0
    converted = sorted(p.name for p in (results / "conversion").glob("*.json"))
    assert converted == ["nl_seed0.json"]  # seed 2 never ran
    result = json.loads((results / "conversion" / "nl_seed0.json").read_text())
    assert set(result["test_top1"]) == {"original", "converted", "finetuned_1_epoch"}
    assert all(0 <= v <= 100 for v in result["test_top1"].values()) and result["test_images"] == 24
    assert result["macs"]["converted"] < result["macs"]["original"]
    assert set(result["latency_ms"]) == {"original", "converted"}
    trained, init = result["query_statistics"]["trained"], result["query_statistics"]["init"]
    assert set(trained) == set(init) and len(trained) == 2  # one NL block in each of stages 2 and 3
    assert all(0 <= block["attention"] <= 2 for block in trained.values())
    assert (work / "nl_seed0_finetune" / "summary.json").is_file()
    assert not (work / "nl_seed0").exists()
    assert (results / "conversion" / "nl_seed0_statistics.png").stat().st_size > 5_000
    table = (results / "conversion" / "summary.md").read_text()
    assert table.startswith("| seed | NL top-1 |") and "| 0 | " in table
    stamp = (results / "conversion" / "nl_seed0.json").stat().st_mtime_ns
    assert main(argv) == 0  # converted runs are skipped
    assert (results / "conversion" / "nl_seed0.json").stat().st_mtime_ns == stamp

    # A recorded NL run whose kept weights were lost runs again; the others stay skipped.
    shutil.rmtree(results / "checkpoints" / "nl_seed1")
    stamps = {p.name: p.stat().st_mtime_ns for p in results.glob("*_seed*.json")}
    assert main(["run", "--results", str(results), "--work", str(work), "--data", str(data), "--epochs", "1",
                 "--seeds", "0", "1", "--variants", "none", "nl", *smoke]) == 0
    assert (results / "checkpoints" / "nl_seed1" / "model.safetensors").is_file()
    changed = {p.name for p in results.glob("*_seed*.json") if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"nl_seed1.json"}


def test_a_queued_run_finished_by_another_driver_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gcnet.study as study

    results, work = tmp_path / "results", tmp_path / "work"
    started = []

    class Child:  # starting none_seed0 "finishes" none_seed1 and nl_seed1 elsewhere
        returncode = 1

        def __init__(self, command: list[str], **kwargs: object) -> None:
            started.append(next(a.split("/")[-1] for a in command if a.startswith("train.out_dir=")))
            results.mkdir(exist_ok=True)
            for name in ("none_seed1", "nl_seed1"):
                (results / f"{name}.json").write_text("{}")
            (results / "checkpoints" / "nl_seed1").mkdir(parents=True, exist_ok=True)

        def poll(self) -> int:
            return self.returncode

    monkeypatch.setattr(study.subprocess, "Popen", Child)
    monkeypatch.setattr(study.time, "sleep", lambda seconds: None)
    assert study.run(work, results, tmp_path, ["none", "nl"], [0, 1], 1, 1) == 0
    # nl_seed1 has its JSON but not its weights: it still runs; none_seed1 does not.
    assert started == ["none_seed0", "nl_seed0", "nl_seed1"]


def test_paired_difference_is_the_t_interval_of_per_seed_differences() -> None:
    variant, base = {0: 91.0, 1: 90.2, 2: 91.4}, {0: 90.5, 1: 90.0, 2: 90.6}
    mean, half, n = paired_difference(variant, base)
    differences = [0.5, 0.2, 0.8]
    assert n == 3 and mean == pytest.approx(0.5)
    assert half == pytest.approx(4.303 * statistics.stdev(differences) / math.sqrt(3))
    assert paired_difference({0: 1.0}, {0: 2.0}) is None
    assert "not run yet" in summary_table(load_results(Path("/nonexistent")))


def test_pairwise_table_is_antisymmetric_and_marks_intervals_that_exclude_zero() -> None:
    accs = {"none": [90.0, 90.1, 89.9], "se": [90.5, 90.7, 90.4], "nl": [90.0, 90.6, 89.5]}
    results = {v: {s: {"test_top1": a} for s, a in enumerate(values)} for v, values in accs.items()}
    lines = pairwise_table(results).splitlines()[2:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines}
    order = ["none", "se", "nl"]  # the study's order of variants
    assert list(rows) == order
    # se - none per seed: 0.5, 0.6, 0.5; sd 0.058, half-width 4.303 * 0.058 / sqrt(3) = 0.14
    assert rows["se"][0] == "+0.53 ± 0.14*" and rows["none"][1] == "-0.53 ± 0.14*"
    assert not rows["nl"][0].endswith("*") and rows["nl"][2].rstrip(" |") == "-"



def test_speed_times_every_variant_against_the_baseline(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    assert main(["speed", "--results", str(tmp_path), "--variants", "gc_r16", "none", "--batch", "2",
                 "--steps", "1", "--rounds", "2"]) == 0
    measured = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert list(measured["variants"]) == ["none", "gc_r16"] and measured["threads"] == 1
    assert measured["variants"]["none"]["vs_baseline"] == 1.0
    assert all(v["images_per_s"] > 0 for v in measured["variants"].values())
    assert torch.get_num_threads() == threads  # the one-thread setting does not leak into the caller
    table = summary_table({}, load_speed(tmp_path))
    alone = measured["variants"]["gc_r16"]["images_per_s"]
    assert f"| gc_r16 | 0 | not run yet | | | | | | {alone:.0f} (" in table
    assert load_speed(tmp_path / "missing") == {}


def test_speed_names_a_count_that_is_not_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        main(["speed", "--results", str(tmp_path), "--rounds", "0"])
    assert not (tmp_path / "speed").exists()
