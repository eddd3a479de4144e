"""Detection and instance segmentation: torchvision's Mask / Faster R-CNN on gcnet ResNet-FPN backbones.

GCNet (arXiv:1904.11492; official repository README) reports COCO Mask R-CNN R50-FPN box/mask AP
37.2/33.8 -> 39.4/35.7 with GC r16 in c3-c5 for a SyncBN backbone, 37.3/34.2 -> 38.5/35.1 with frozen
BN (44.4M -> 46.9M parameters); the two shipped configs follow those settings. This package builds those detectors with any gcnet
context block, reads COCO json + image folders (bad records reported by image id and skipped),
and scores them with pycocotools' COCOeval; `DetectionTask` trains them on the shared loop.

Entry points: `create_detector`, `evaluate_detection(model, dataset)`; runs go through
`gcnet train` / `gcnet eval` with a `task: detection` config (`gcnet.builder`).
"""

from gcnet.detection.data import (
    CocoDetection,
    DataReport,
    DetectionBatch,
    Problem,
    SkippedImage,
    aspect_ratio_groups,
    collate_detection,
    detection_transforms,
    segmentation_to_mask,
)
from gcnet.detection.evaluate import (
    STAT_NAMES,
    DetectionEvaluation,
    coco_stats,
    draw_predictions,
    Predictions,
    evaluate_detection,
    predict_detection,
    score_detection,
    to_coco_results,
)
from gcnet.detection.models import (
    ARCHITECTURES,
    backbone_names,
    build_detector,
    convert_frozen_batchnorm,
    create_detector,
    freeze_layers,
    fpn_backbone,
    resnet_fpn_backbone,
)
from gcnet.detection.task import LOSS_NAMES, DetectionTask

__all__ = [
    "ARCHITECTURES",
    "LOSS_NAMES",
    "STAT_NAMES",
    "CocoDetection",
    "DataReport",
    "DetectionBatch",
    "DetectionEvaluation",
    "DetectionTask",
    "Predictions",
    "Problem",
    "SkippedImage",
    "aspect_ratio_groups",
    "backbone_names",
    "build_detector",
    "coco_stats",
    "collate_detection",
    "convert_frozen_batchnorm",
    "create_detector",
    "detection_transforms",
    "draw_predictions",
    "evaluate_detection",
    "fpn_backbone",
    "freeze_layers",
    "predict_detection",
    "resnet_fpn_backbone",
    "score_detection",
    "segmentation_to_mask",
    "to_coco_results",
]
