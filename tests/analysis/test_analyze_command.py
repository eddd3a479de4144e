import json
from pathlib import Path

import pytest
import torch

from gcnet.cli import main
from gcnet.builder import train
from gcnet.config import config_from_dict
from tests.engine.tiny import image_config, make_image_folder


@pytest.mark.parametrize("mode", ["dot_product"])
def test_analyze_a_trained_checkpoint(mode: str, tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path / "images", classes=3, per_class=4, size=16)
    config = image_config(
        images,
        tmp_path / "run",
        model={
            "name": "cifar_resnet20",
            "context": {"block": "gc", "reduction": 4},
            "nonlocal_blocks": {"indices": [[], [1], []], "mode": mode},
        },
        data={"image_size": 16, "val_fraction": 0.0},
        train={"epochs": 1},
    )
    train(config_from_dict(config))
    out = tmp_path / "report"
    assert main(["analyze", str(tmp_path / "run"), "--data", str(images), "--out", str(out), "--batches", "2", "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nreport:")[0])
    nl = [name for name, row in summary.items() if row["kind"] == f"nl-{mode}"]
    gc = [name for name, row in summary.items() if row["kind"] == "gc"]
    assert len(nl) == 1 and len(gc) == 6  # stages 2 and 3, three blocks each
    assert all(summary[name]["attention"] == 0 for name in gc)
    report = (out / "report.md").read_text()
    assert f"| {nl[0]} | nl-{mode} |" in report
    assert (out / "statistics.png").stat().st_size > 5_000 and (out / "attention_maps.png").stat().st_size > 5_000


def test_analyze_names_a_missing_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "nothing"), "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "gcnet analyze:" in capsys.readouterr().err


def test_analyze_skips_corrupt_files_and_refuses_zero_batches(tmp_path: Path, capsys, caplog) -> None:
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=16)
    config = image_config(images, tmp_path / "run", model={"name": "cifar_resnet20", "num_classes": 2,
                                                           "context": {"block": "gc", "reduction": 4}},
                          data={"image_size": 16, "val_fraction": 0.0}, train={"epochs": 1})
    train(config_from_dict(config))
    (images / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "report"
    threads = torch.get_num_threads()
    try:  # --set train.threads reaches analyze (and eval), as it does train
        assert main(["analyze", str(tmp_path / "run"), "--data", str(images), "--out", str(out),
                     "--batch-size", "4", "--set", "train.threads=1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "analysis skipped corrupt file" in caplog.text and "broken.jpg" in caplog.text
    assert main(["analyze", str(tmp_path / "run"), "--data", str(images), "--out", str(out), "--batches", "0"]) == 2
    assert "--batches and --batch-size must be >= 1" in capsys.readouterr().err
