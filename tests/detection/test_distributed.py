"""Detection under torchrun (2 gloo ranks) matches one process on the same global batch; SIGKILL resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gcnet.builder import train
from gcnet.config import config_from_dict
from gcnet.engine import load_checkpoint
from gcnet.engine.metrics import read_csv
from tests.detection.test_train import tiny_config
from tests.engine.tiny import kill_after_steps

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT))
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _config(tmp_path: Path, out: str, **train_options: Any) -> dict[str, Any]:
    config = tiny_config(tmp_path / "data", tmp_path / out, images=6, epochs=2, max_steps_per_epoch=2,
                         picture_images=0, threads=1, plot=False, **train_options)
    # Frozen BN: no running statistics, so ranks and micro-batches leave the same model.
    config["model"]["detector"].update(frozen_bn=True, trainable_layers=5)
    config["data"]["aspect_ratio_group_factor"] = 0
    return config


def _in_process(config: dict[str, Any]) -> list[float]:
    threads = torch.get_num_threads()
    try:
        return train(config_from_dict(config)).step_losses
    finally:
        torch.set_num_threads(threads)


def _write(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_gloo_ranks_match_one_process_accumulating_two_micro_batches(tmp_path: Path) -> None:
    ddp = _write(_config(tmp_path, "ddp"), tmp_path / "ddp.yaml")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "gcnet.cli", "train", str(ddp)], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    single = _in_process(_config(tmp_path, "single", accumulation_steps=2))
    ddp_rows = read_csv(tmp_path / "ddp" / "steps.csv")
    single_rows = read_csv(tmp_path / "single" / "steps.csv")
    assert len(ddp_rows) == len(single) == 4
    for a, b in zip(ddp_rows, single_rows):  # every loss term, up to float reassociation of the gradients
        for key in ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["step"], key)
    ddp_ckpt, single_ckpt = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "single")
    assert ddp_ckpt.state["world_size"] == 2 and set(ddp_ckpt.model) == set(single_ckpt.model)
    for key, value in single_ckpt.model.items():
        torch.testing.assert_close(ddp_ckpt.model[key], value, rtol=1e-3, atol=1e-5, msg=key)
    ddp_val = read_csv(tmp_path / "ddp" / "metrics.csv")[-1]
    single_val = read_csv(tmp_path / "single" / "metrics.csv")[-1]
    assert float(ddp_val["val_bbox_AP"]) == pytest.approx(float(single_val["val_bbox_AP"]), abs=0.02)


def test_sigkilled_detection_run_resumes_to_the_same_losses(tmp_path: Path) -> None:
    config = _config(tmp_path, "killed", checkpoint_every_steps=1)
    path = _write(config, tmp_path / "killed.yaml")
    command = [sys.executable, "-m", "gcnet.cli", "train", str(path)]
    steps_csv = tmp_path / "killed" / "steps.csv"
    kill_after_steps(command, _env(), steps_csv, 2, timeout=180)
    saved = load_checkpoint(tmp_path / "killed").state["step"]
    assert 1 <= saved < 4

    resumed = subprocess.run([*command, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {tmp_path / 'killed' / 'checkpoints'}" in resumed.stderr

    reference = _in_process({**config, "train": {**config["train"], "out_dir": str(tmp_path / "reference")}})
    assert [float(r["loss"]) for r in read_csv(steps_csv)] == reference
    assert load_checkpoint(tmp_path / "killed").state["step"] == 4
