"""Training, COCO evaluation, checkpoints, CLI and config of the detection package on generated images."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from gcnet.cli import main
from gcnet.detection import (
    STAT_NAMES,
    CocoDetection,
    coco_stats,
    detection_config_from_dict,
    detection_transforms,
    evaluate_detection_checkpoint,
    is_detection_checkpoint,
    is_detection_config,
    load_detection_config,
    train_detection,
)
from tests.detection.synthetic import make_coco

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "detection").glob("*.yaml"))


def tiny_config(root: Path, out_dir: Path, **train: Any) -> dict[str, Any]:
    """A ResNet-18-FPN Mask R-CNN with 16 FPN channels on 64-pixel images: seconds per step on a CPU."""
    images, annotations = make_coco(root, images=4)
    return {
        "task": "detection",
        "model": {
            "architecture": "mask_rcnn",
            "backbone": "resnet18",
            "context": "gc",
            "reduction": 4,
            "trainable_layers": 5,
            "frozen_bn": False,
            "fpn_channels": 16,
            "min_size": [64],
            "max_size": 80,
            "rpn_pre_nms_top_n_train": 100,
            "rpn_post_nms_top_n_train": 50,
            "rpn_pre_nms_top_n_test": 100,
            "rpn_post_nms_top_n_test": 50,
            "box_batch_size_per_image": 16,
            "box_detections_per_img": 20,
        },
        "data": {
            "images": str(images),
            "annotations": str(annotations),
            "batch_size": 2,
            "eval_batch_size": 2,
        },
        "optim": {"lr": 0.01, "grad_clip_norm": 10.0},
        "schedule": {"milestones": []},
        "train": {
            "epochs": 1,
            "max_steps_per_epoch": 2,
            "device": "cpu",
            "out_dir": str(out_dir),
            "picture_images": 2,
            "picture_score_threshold": 0.0,
            **train,
        },
    }


def test_train_step_has_finite_loss_and_writes_checkpoint_metrics_and_pictures(tmp_path: Path) -> None:
    data = tiny_config(tmp_path / "data", tmp_path / "run")
    (tmp_path / "data" / "images" / "000003.jpg").write_bytes(b"\x00garbage")  # reported, skipped
    result = train_detection(detection_config_from_dict(data))
    assert len(result.step_losses) >= 1 and all(math.isfinite(v) for v in result.step_losses)
    assert 3 in result.skipped_image_ids and result.seconds_per_step > 0
    evaluation = result.evaluation
    assert evaluation is not None and set(evaluation.metrics) == {"bbox", "segm"}
    assert list(evaluation.metrics["bbox"]) == list(STAT_NAMES)
    assert [s.image_id for s in evaluation.skipped] == [3] and evaluation.images == 3
    run = tmp_path / "run"
    for name in (
        "predictions.png",
        "loss_curve.png",
        "steps.csv",
        "metrics.csv",
        "summary.json",
        "config.json",
    ):
        assert (run / name).is_file(), name
    last = json.loads((run / "checkpoints" / "last.json").read_text())["dir"]
    assert (run / "checkpoints" / last / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_image_ids"] == [3] and "bbox" in summary["evaluation"]["metrics"]

    # The CLI pair: gcnet detect-eval on the checkpoint prints COCO metrics; a second train refuses the folder.
    images, annotations = data["data"]["images"], data["data"]["annotations"]
    assert (
        main(
            [
                "detect-eval",
                str(run),
                "--data",
                images,
                "--annotations",
                annotations,
                "--picture",
                str(tmp_path / "eval.png"),
                "--max-images",
                "2",
            ]
        )
        == 0
    )
    assert (tmp_path / "eval.png").is_file()
    assert is_detection_checkpoint(run)
    # `gcnet eval` dispatches a detection checkpoint to COCO evaluation (data: a COCO root).
    assert main(["eval", str(run), "--data", str(tmp_path / "data")]) == 0
    again = evaluate_detection_checkpoint(run, images, annotations, max_images=2)
    assert again.images == 2 and set(again.metrics) == {"bbox", "segm"}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    assert main(["detect-train", str(config_file)]) == 2  # out_dir holds a checkpoint
    assert main(["train", str(config_file)]) == 2  # `gcnet train` dispatches task: detection the same way


def test_coco_evaluation_scores_ground_truth_as_perfect(tmp_path: Path) -> None:
    images, annotations = make_coco(tmp_path, images=3)
    dataset = CocoDetection(images, annotations, train=False, transform=detection_transforms(False))
    gt = dataset.coco_ground_truth()
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
            "segmentation": gt.annToRLE(a),
        }
        for a in gt.dataset["annotations"]
    ]
    for iou in ("bbox", "segm"):
        stats = coco_stats(dataset, results, iou, dataset.image_ids)
        assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
        assert stats["APl"] is None  # no large objects in 64x80 images: COCOeval's -1
    empty = coco_stats(dataset, [], "bbox", dataset.image_ids)
    assert empty["AP"] == 0.0


def test_faster_rcnn_trains_without_masks(tmp_path: Path) -> None:
    data = tiny_config(tmp_path / "data", tmp_path / "run", picture_images=0)
    data["model"].update(architecture="faster_rcnn", context="se", reduction=4)
    data["train"]["max_steps_per_epoch"] = 1
    result = train_detection(detection_config_from_dict(data))
    assert result.evaluation is not None and set(result.evaluation.metrics) == {"bbox"}
    assert math.isfinite(result.step_losses[0])


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = tiny_config(tmp_path / "data", tmp_path / "run")
    with pytest.raises(ValueError, match="unknown config key 'model.backbon'"):
        detection_config_from_dict({**base, "model": {**base["model"], "backbon": "resnet50"}})
    with pytest.raises(ValueError, match="'task'"):
        detection_config_from_dict({k: v for k, v in base.items() if k != "task"})
    with pytest.raises(ValueError, match="'task'"):
        detection_config_from_dict({**base, "task": "classification"})
    with pytest.raises(TypeError, match="'data.batch_size'"):
        detection_config_from_dict({**base, "data": {**base["data"], "batch_size": "two"}})
    with pytest.raises(ValueError, match="'model.trainable_layers'"):
        detection_config_from_dict({**base, "model": {**base["model"], "trainable_layers": 7}})
    config = detection_config_from_dict({**base, "optim": {"lr": 0.005}})
    assert config.optim.weight_decay == 1e-4 and config.schedule.name == "step"  # detection defaults kept


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    assert is_detection_config(path)
    config = load_detection_config(path, ["train.epochs=1"])
    assert config.task == "detection" and config.train.epochs == 1
