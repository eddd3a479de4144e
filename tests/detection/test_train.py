"""Detection on the shared training loop: steps, COCO evaluation, checkpoints, pictures and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from gcnet.builder import evaluate_checkpoint, train
from gcnet.cli import main
from gcnet.config import config_from_dict
from gcnet.detection import STAT_NAMES, CocoDetection, coco_stats, detection_transforms
from gcnet.engine import load_checkpoint
from tests.detection.synthetic import make_coco


def tiny_config(root: Path, out_dir: Path, images: int = 4, **train: Any) -> dict[str, Any]:
    """A ResNet-18-FPN Mask R-CNN with 16 FPN channels on 64-pixel images: seconds per step on a CPU."""
    image_dir, annotations = make_coco(root, images=images)
    return {
        "task": "detection",
        "model": {
            "name": "resnet18",
            "context": {"block": "gc", "reduction": 4},
            "detector": {
                "architecture": "mask_rcnn",
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
        },
        "data": {"train": str(image_dir), "train_annotations": str(annotations), "batch_size": 2,
                 "eval_batch_size": 2},
        "optim": {"lr": 0.01, "grad_clip_norm": 10.0},
        "schedule": {"milestones": []},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "device": "cpu", "out_dir": str(out_dir),
                  "picture_images": 2, "picture_score_threshold": 0.0, "progress": False, **train},
    }


def test_train_step_has_finite_loss_and_writes_checkpoint_metrics_and_pictures(tmp_path: Path) -> None:
    data = tiny_config(tmp_path / "data", tmp_path / "run")
    (tmp_path / "data" / "images" / "000003.jpg").write_bytes(b"\x00garbage")  # reported, skipped
    result = train(config_from_dict(data))
    assert len(result.step_losses) == 2 and all(math.isfinite(v) for v in result.step_losses)
    assert any("image 3 " in s for s in result.skipped) and result.seconds_per_step > 0
    assert result.val is not None and result.val["images"] == 3
    assert {f"bbox_{n}" for n in STAT_NAMES} | {f"segm_{n}" for n in STAT_NAMES} <= set(result.val)
    run = tmp_path / "run"
    for name in ("predictions.png", "loss_curve.png", "curves.png", "steps.csv", "metrics.csv", "summary.json",
                 "config.json"):
        assert (run / name).is_file(), name
    steps = (run / "steps.csv").read_text().splitlines()
    assert steps[0].startswith("step,epoch,loss,loss_classifier,loss_box_reg,loss_mask,loss_objectness")
    ckpt = load_checkpoint(run)
    assert ckpt.state["num_classes"] == 3 and [label for label, _ in ckpt.state["label_to_category"]] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "detection" and any("image 3 " in s for s in summary["skipped"])
    assert summary["val"]["bbox_AP"] == result.val["bbox_AP"]

    # gcnet eval on the checkpoint prints COCO metrics; a second train refuses the folder.
    images, annotations = data["data"]["train"], data["data"]["train_annotations"]
    assert main(["eval", str(run), "--data", images, "--annotations", annotations,
                 "--picture", str(tmp_path / "eval.png"), "--max-images", "2"]) == 0
    assert (tmp_path / "eval.png").is_file()
    assert main(["eval", str(run), "--data", str(tmp_path / "data")]) == 0  # a COCO root
    again = evaluate_checkpoint(run, images, annotations=annotations, max_images=2)
    assert again["images"] == 2 and "segm_AP" in again
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    assert main(["train", str(config_file)]) == 2  # out_dir holds a checkpoint


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
    data = tiny_config(tmp_path / "data", tmp_path / "run", picture_images=0, max_steps_per_epoch=1)
    data["model"]["detector"]["architecture"] = "faster_rcnn"
    data["model"]["context"] = {"block": "se", "reduction": 4}
    result = train(config_from_dict(data))
    assert result.val is not None and "bbox_AP" in result.val and result.val.get("segm_AP") is None
    assert math.isfinite(result.step_losses[0])
