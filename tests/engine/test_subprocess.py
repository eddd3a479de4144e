"""Runs in child processes: a SIGKILLed run resumes; torchrun with 2 gloo ranks matches one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gcnet.builder import train
from gcnet.config import config_from_dict
from gcnet.engine import load_checkpoint
from gcnet.engine.metrics import read_csv
from tests.engine.tiny import TinyNet, image_config, kill_after_steps, make_image_folder

SCRIPT = Path(__file__).with_name("run_tiny.py")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[2] / "src"))
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _single_process_reference(config: dict) -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children run with one thread; match their arithmetic exactly
    try:
        return train(config_from_dict(config), model=lambda c: TinyNet(c.model.num_classes)).step_losses
    finally:
        torch.set_num_threads(threads)


def test_sigkilled_run_resumes_from_last_complete_checkpoint(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", classes=3, per_class=8, size=12)
    config = image_config(images, tmp_path / "killed", train={"epochs": 4, "checkpoint_every_steps": 2})
    path = _write(config, tmp_path / "config.yaml")
    steps_csv = tmp_path / "killed" / "steps.csv"
    kill_after_steps([sys.executable, str(SCRIPT), str(path), "--slow"], _env(), steps_csv, 7, timeout=60)
    logged = len(read_csv(steps_csv))
    saved = load_checkpoint(tmp_path / "killed").state["step"]
    assert 4 <= saved <= logged < 12, (saved, logged)

    resumed = subprocess.run([sys.executable, str(SCRIPT), str(path), "--resume"], env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {tmp_path / 'killed' / 'checkpoints'}" in resumed.stderr

    config["train"]["out_dir"] = str(tmp_path / "reference")
    reference = _single_process_reference(config)
    losses = [float(r["loss"]) for r in read_csv(steps_csv)]
    assert len(losses) == 12 and losses == reference
    assert load_checkpoint(tmp_path / "killed").state["step"] == 12


def test_torchrun_two_gloo_ranks_match_single_process(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", classes=3, per_class=8, size=12)
    # 17 train images after holding out 7: 2 steps of 8 = 2 ranks x 4 (the sampler pads rank shards to 9).
    config = image_config(images, tmp_path / "ddp", data={"batch_size": 8, "val_fraction": 0.3},
                          model={"name": "cifar_resnet20", "num_classes": 3, "sync_batchnorm": True},
                          train={"epochs": 2})
    path = _write(config, tmp_path / "config.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               str(path)]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]

    config["train"]["out_dir"] = str(tmp_path / "single")
    reference = _single_process_reference(config)
    ddp_losses = [float(r["loss"]) for r in read_csv(tmp_path / "ddp" / "steps.csv")]
    assert len(ddp_losses) == len(reference) == 4
    assert ddp_losses == pytest.approx(reference, rel=1e-5, abs=1e-6)  # equal up to float reassociation

    ddp, single = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "single")
    assert ddp.state["world_size"] == 2 and single.state["world_size"] == 1
    assert set(ddp.model) == set(single.model) == set(TinyNet(3).state_dict())  # loads into a plain model
    for key in single.model:
        torch.testing.assert_close(ddp.model[key], single.model[key], rtol=1e-4, atol=1e-5)
    assert set(ddp.state) == set(single.state)
    assert ddp.state["step"] == single.state["step"] == 4
    for a, b in zip(read_csv(tmp_path / "ddp" / "metrics.csv"), read_csv(tmp_path / "single" / "metrics.csv")):
        assert float(a["val_top1"]) == pytest.approx(float(b["val_top1"]))


def test_ddp_summary_matches_gcnet_eval_of_the_saved_checkpoint(tmp_path: Path) -> None:
    from gcnet.builder import evaluate_checkpoint

    images = make_image_folder(tmp_path / "images", classes=3, per_class=8, size=12)
    held_out = make_image_folder(tmp_path / "val", classes=3, per_class=5, size=12, seed=1)
    # Without SyncBatchNorm each rank's BN statistics drift apart; evaluation must use rank 0's, the saved ones.
    config = image_config(images, tmp_path / "ddp", data={"batch_size": 8, "val_fraction": 0.0, "val": str(held_out),
                                                          "eval_batch_size": 4}, train={"epochs": 1})
    path = _write(config, tmp_path / "config.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               str(path)]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = yaml.safe_load((tmp_path / "ddp" / "summary.json").read_text())
    again = evaluate_checkpoint(tmp_path / "ddp", str(held_out), model=TinyNet(3))
    assert summary["val"]["samples"] == again["samples"] == 15
    assert summary["val"]["loss"] == pytest.approx(again["loss"], rel=1e-6)
    assert summary["val"]["top1"] == pytest.approx(again["top1"])
