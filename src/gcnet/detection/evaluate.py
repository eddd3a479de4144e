"""COCO evaluation of a detector by pycocotools: bbox and segm AP, AP50, AP75, APs/m/l, AR.

    images -> detector (eval) -> boxes xyxy, labels, scores [, masks (N, 1, H, W) probabilities]
           -> COCO results (xywh boxes, category ids, RLE of masks > 0.5) -> COCOeval -> 12 stats

Stats follow COCOeval.summarize: AP at IoU .50:.95 over all / small / medium / large objects, AP
at .50 and .75, AR at 1, 10, 100 detections. A size range without ground truth has no AP
(COCOeval's -1), returned as None.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from gcnet.detection.data import CocoDetection, SkippedImage, collate_detection

logger = logging.getLogger("gcnet.detection")

STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


@dataclass
class DetectionEvaluation:
    """COCO metrics per IoU type ("bbox", "segm"), what was evaluated and skipped, and the raw outputs.

    `metrics[iou_type][name]` is a fraction in [0, 1] (None where COCOeval has no ground truth);
    `outputs` keeps the first `keep_outputs` images and predictions for pictures.
    """

    metrics: dict[str, dict[str, float | None]]
    images: int
    detections: int
    seconds: float
    skipped: list[SkippedImage] = field(default_factory=list)
    kept: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)

    def flat(self) -> dict[str, float | None]:
        """{"bbox_AP": ..., "segm_AP50": ...} for CSV rows and JSON."""
        return {
            f"{iou}_{name}": value for iou, stats in self.metrics.items() for name, value in stats.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (without the kept images)."""
        return {
            "metrics": self.metrics,
            "images": self.images,
            "detections": self.detections,
            "seconds": self.seconds,
            "skipped": [{"image_id": s.image_id, "path": s.path, "reason": s.reason} for s in self.skipped],
        }


def to_coco_results(
    output: Mapping[str, Tensor],
    image_id: int,
    label_to_category: Mapping[int, int],
    mask_threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's predictions as COCO bbox results and (if it has masks) segm results."""
    boxes = output["boxes"].detach().cpu().double()  # (N, 4) xyxy
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().cpu().tolist()
    categories = [label_to_category[int(label)] for label in output["labels"].detach().cpu().tolist()]
    bbox = [
        {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
        for b, c, s in zip(xywh, categories, scores)
    ]
    segm: list[dict[str, Any]] = []
    if "masks" in output:
        binary = (output["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)  # (N, H, W)
        for mask, c, s in zip(binary, categories, scores):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            segm.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    return bbox, segm


def coco_stats(
    dataset: CocoDetection, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int]
) -> dict[str, float | None]:
    """COCOeval of `results` against the dataset's ground truth on `image_ids`; stats by STAT_NAMES."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"unknown iou_type {iou_type!r}; expected 'bbox' or 'segm'")
    gt = dataset.coco_ground_truth()
    if (
        not results
    ):  # COCO.loadRes cannot take an empty list: nothing detected is 0 AP and AR (None without ground truth)
        has_gt = bool(gt.getAnnIds(imgIds=list(image_ids), iscrowd=False))
        return {name: (0.0 if has_gt else None) for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        detections = gt.loadRes(results)
        evaluator = COCOeval(gt, detections, iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if value < 0 else float(value)) for name, value in zip(STAT_NAMES, evaluator.stats)}


@dataclass
class Predictions:
    """COCO results of the images one process evaluated, ready to be gathered and scored."""

    bbox: list[dict[str, Any]] = field(default_factory=list)
    segm: list[dict[str, Any]] = field(default_factory=list)
    evaluated: list[int] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    kept: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)
    has_masks: bool = False
    seconds: float = 0.0

    def merge(self, others: Sequence[Predictions]) -> Predictions:
        """These predictions and those of other processes as one (kept pictures from this one)."""
        merged = Predictions(kept=self.kept)
        for part in (self, *others):
            merged.bbox += part.bbox
            merged.segm += part.segm
            merged.evaluated += part.evaluated
            merged.skipped += part.skipped
            merged.has_masks = merged.has_masks or part.has_masks
            merged.seconds = max(merged.seconds, part.seconds)
        return merged


@torch.no_grad()
def predict_detection(
    model: nn.Module,
    dataset: CocoDetection,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 1,
    workers: int = 0,
    device: torch.device | str = "cpu",
    keep_outputs: int = 0,
    mask_threshold: float = 0.5,
) -> Predictions:
    """Run `model` in eval mode over `dataset` (or the items at `indices`: one process's share) into COCO results."""
    if not isinstance(dataset, CocoDetection):
        raise TypeError(f"dataset must be a CocoDetection, got {type(dataset).__name__}")
    if dataset.train:
        raise ValueError(
            "evaluate on a CocoDetection built with train=False (it keeps crowd regions and empty images)"
        )
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset if indices is None else Subset(dataset, list(indices)),
        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_detection,
    )
    result = Predictions()
    started = time.perf_counter()
    for batch in loader:
        result.skipped.extend(batch.skipped)
        if not batch.images:
            continue
        outputs = model([image.to(device) for image in batch.images])
        for image, target, output in zip(batch.images, batch.targets, outputs):
            image_id = int(target["image_id"])
            boxes, masks = to_coco_results(output, image_id, dataset.label_to_category, mask_threshold)
            result.bbox.extend(boxes)
            result.segm.extend(masks)
            result.has_masks = result.has_masks or "masks" in output
            result.evaluated.append(image_id)
            if len(result.kept) < keep_outputs:
                result.kept.append((image, {k: v.cpu() for k, v in output.items()}))
    result.seconds = time.perf_counter() - started
    model.train(was_training)
    return result


def score_detection(dataset: CocoDetection, predictions: Predictions) -> DetectionEvaluation:
    """COCOeval of gathered predictions against the dataset's ground truth (bbox, and segm with masks)."""
    if predictions.skipped:
        logger.warning(
            "evaluation skipped %d unreadable images: %s",
            len(predictions.skipped),
            [s.image_id for s in predictions.skipped],
        )
    if not predictions.evaluated:
        raise ValueError(
            f"no image of {dataset.report.source} could be evaluated (all {len(predictions.skipped)} unreadable)"
        )
    evaluated = sorted(predictions.evaluated)
    metrics = {"bbox": coco_stats(dataset, predictions.bbox, "bbox", evaluated)}
    if predictions.has_masks and dataset.masks:
        metrics["segm"] = coco_stats(dataset, predictions.segm, "segm", evaluated)
    if not predictions.bbox:
        logger.warning("the detector made no detections on %d images", len(evaluated))
    result = DetectionEvaluation(metrics, len(evaluated), len(predictions.bbox), predictions.seconds,
                                 predictions.skipped, predictions.kept)
    logger.info("COCO evaluation on %d images: %s", len(evaluated), format_metrics(result.metrics))
    return result


def evaluate_detection(
    model: nn.Module,
    dataset: CocoDetection,
    *,
    batch_size: int = 1,
    workers: int = 0,
    device: torch.device | str = "cpu",
    keep_outputs: int = 0,
    mask_threshold: float = 0.5,
) -> DetectionEvaluation:
    """Run `model` in eval mode over `dataset` and score it with pycocotools' COCOeval.

    Images that fail to decode are reported by id (logged, listed in `skipped`) and left out of
    the evaluated image ids. Segm metrics appear when the model predicts masks and the dataset has them.
    """
    predictions = predict_detection(model, dataset, batch_size=batch_size, workers=workers, device=device,
                                    keep_outputs=keep_outputs, mask_threshold=mask_threshold)
    return score_detection(dataset, predictions)


def format_metrics(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    """'bbox AP 12.3 AP50 ... | segm AP ...' in percent, '-' where undefined."""
    parts = []
    for iou, stats in metrics.items():
        shown = " ".join(
            f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in stats.items() if k in STAT_NAMES[:6]
        )
        parts.append(f"{iou} {shown}")
    return " | ".join(parts)


def draw_predictions(
    samples: Sequence[tuple[Tensor, Mapping[str, Tensor]]],
    path: str | Path,
    category_names: Mapping[int, str] | None = None,
    label_to_category: Mapping[int, int] | None = None,
    score_threshold: float = 0.5,
    columns: int = 2,
) -> Path:
    """Draw predicted masks, boxes and "name score" labels on images and save them as one PNG grid.

    Args:
        samples: (image (3, H, W) float in [0, 1], prediction dict of boxes, labels, scores[, masks]).
        path: output PNG.
        category_names, label_to_category: label -> category id -> name for the captions.
        score_threshold: lowest score drawn.
        columns: images per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    if not samples:
        raise ValueError("no images to draw")
    path = Path(path)
    rows = (len(samples) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, output) in zip(axes.flat, samples):
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8)  # (3, H, W)
        keep = output["scores"] >= score_threshold
        labels = output["labels"][keep].tolist()
        if "masks" in output and keep.any():
            canvas = draw_segmentation_masks(canvas, output["masks"][keep][:, 0] > 0.5, alpha=0.45)
        captions = []
        for label, score in zip(labels, output["scores"][keep].tolist()):
            category = label_to_category.get(label, label) if label_to_category else label
            name = category_names.get(category, str(category)) if category_names else str(category)
            captions.append(f"{name} {score:.2f}")
        if keep.any():
            canvas = draw_bounding_boxes(canvas, output["boxes"][keep], labels=captions, width=2)
        ax.imshow(canvas.permute(1, 2, 0).numpy())
        ax.set_title(f"{int(keep.sum())} detections >= {score_threshold}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
