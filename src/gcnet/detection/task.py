"""Detection as a task of the training loop: torchvision's summed losses, COCO evaluation sharded over ranks.

    micro-batch -> detector(images, targets) -> {classifier, box_reg, [mask], objectness, rpn_box_reg}
                -> sum (differentiated), each term logged
    evaluation: each rank predicts its share -> gathered on rank 0 -> COCOeval -> metrics to all ranks
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcnet.detection.data import CocoDetection, DetectionBatch, aspect_ratio_groups, collate_detection
from gcnet.detection.evaluate import STAT_NAMES, DetectionEvaluation, draw_predictions, predict_detection, score_detection
from gcnet.engine.distributed import DistContext, all_gather_objects, broadcast_object
from gcnet.engine.evaluate import autocast
from gcnet.engine.task import StepLoss, Task

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


class DetectionTask(Task):
    """Mask / Faster R-CNN training on COCO-style data and COCO evaluation of its val and test splits.

    Args:
        model: the detector, on `device`.
        train_set: training CocoDetection (train=True).
        val_set, test_set: evaluation CocoDetections (train=False); val may be the training images.
        num_classes: the detector's classes including background (saved with checkpoints).
        device, precision: where and how batches run.
        eval_batch_size, workers: evaluation loader settings (global batch).
        aspect_ratio_group_factor: batches share an aspect-ratio bin; 0 mixes them.
        picture_images, picture_score_threshold: predictions drawn after the final evaluation.
    """

    loss_terms = LOSS_NAMES
    eval_fields = tuple(f"{iou}_{name}" for iou in ("bbox", "segm") for name in STAT_NAMES[:6])
    score_name = "bbox_AP"

    def __init__(self, model: nn.Module, train_set: CocoDetection, val_set: CocoDetection,
                 test_set: CocoDetection | None, num_classes: int, device: torch.device, precision: str = "fp32",
                 eval_batch_size: int = 1, workers: int = 0, aspect_ratio_group_factor: int = 3,
                 picture_images: int = 4, picture_score_threshold: float = 0.5) -> None:
        self.model, self.train_set, self.num_classes = model, train_set, num_classes
        self.splits = {"val": val_set, "test": test_set}
        self.device, self.precision = device, precision
        self.eval_batch_size, self.workers = eval_batch_size, workers
        self.groups = (aspect_ratio_groups(train_set.aspect_ratios(), aspect_ratio_group_factor)
                       if aspect_ratio_group_factor else None)
        self.picture_images, self.picture_score_threshold = picture_images, picture_score_threshold
        self.last: tuple[CocoDetection, DetectionEvaluation] | None = None

    def collate(self, items: Sequence[Any]) -> DetectionBatch:
        return collate_detection(items)

    def skipped(self, batch: DetectionBatch) -> list[str]:
        return [f"image {s.image_id} ({s.path}: {s.reason})" for s in batch.skipped]

    def loss(self, model: nn.Module, batch: DetectionBatch) -> StepLoss | None:
        if not batch.images:
            return None
        images = [image.to(self.device) for image in batch.images]
        targets = [{k: v.to(self.device) for k, v in t.items()} for t in batch.targets]
        with autocast(self.device, self.precision):
            losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        return StepLoss(loss, samples=len(images), terms=losses)  # type: ignore[arg-type]

    def evaluate(self, model: nn.Module, split: str, context: DistContext, final: bool = False) -> dict[str, Any] | None:
        dataset = self.splits.get(split)
        if dataset is None:
            return None
        keep = self.picture_images if final and context.is_main else 0
        mine = predict_detection(model, dataset, indices=range(context.rank, len(dataset), context.world_size),
                                 batch_size=max(self.eval_batch_size // context.world_size, 1),
                                 workers=self.workers, device=self.device, keep_outputs=keep)
        shares = all_gather_objects(context, dataclasses.replace(mine, kept=[]))
        metrics = None
        if context.is_main:
            evaluation = score_detection(dataset, mine.merge(shares[1:]))  # type: ignore[arg-type]
            if final:
                self.last = (dataset, evaluation)
            metrics = {**evaluation.flat(), "images": evaluation.images, "detections": evaluation.detections,
                       "skipped_paths": [f"image {s.image_id} ({s.path})" for s in evaluation.skipped]}
        return broadcast_object(context, metrics)  # type: ignore[return-value]

    def checkpoint_state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes,
                "label_to_category": [[k, v] for k, v in sorted(self.train_set.label_to_category.items())]}

    def finish(self, out_dir: Path, title: str) -> None:
        self.picture(out_dir / "predictions.png")

    def picture(self, path: Path) -> None:
        """Draw the predictions kept by the last final evaluation (nothing when none were kept)."""
        if self.last is not None and self.last[1].kept:
            dataset, evaluation = self.last
            draw_predictions(evaluation.kept, path, dataset.category_names, dataset.label_to_category,
                             self.picture_score_threshold)
