"""Detection run configuration: typed dataclasses loaded from YAML with `task: detection`.

Same rules as `gcnet.engine.config` (whose checker and optim / schedule sections it reuses):
unknown keys raise ValueError naming the dotted key and the allowed ones, wrong types TypeError.
The optim and schedule sections start from detection defaults (SGD lr 0.02, weight decay 1e-4,
step decay at epochs 8 and 11 of 12: torchvision's and mmdetection's "1x" recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from gcnet.engine.config import (
    OptimConfig,
    ScheduleConfig,
    apply_overrides,
    build_section,
    plain_data,
    read_config_data,
)

TASK = "detection"
OPTIM_DEFAULTS: dict[str, Any] = {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4}
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "name": "step",
    "milestones": [8, 11],
    "gamma": 0.1,
    "warmup_epochs": 0.0,
    "warmup_start_factor": 0.001,
}


@dataclass
class DetectionModelConfig:
    """The detector and its backbone (see `gcnet.detection.models`).

    Args:
        architecture: "mask_rcnn" or "faster_rcnn".
        backbone: a registered ResNet/ResNeXt name, e.g. "resnet50", "resnet18", "resnext101_32x8d".
        num_classes: including background; None takes it from the data (K + 1, or max id + 1
            with data.category_mapping = coco_ids).
        context, reduction, stages: context block per residual block, its divisor, stages c2..c5
            that get one (None keeps the backbone's preset, c3-c5).
        nonlocal_indices: per stage, residual blocks followed by a non-local block.
        backbone_options: further `create_model` options (position, context_options, ...).
        weights, weights_source: backbone checkpoint file and its layout ("torchvision" ImageNet,
            "mmdet" detector `backbone.*` keys); None trains from random init.
        trainable_layers, frozen_bn: torchvision's freezing (3 and frozen for pretrained backbones).
        fpn_channels: FPN width (256 in the papers).
        min_size, max_size: short side(s) the detector resizes to (random choice in training), long-side cap.
        rpn_*, box_*: torchvision's proposal counts, RoI sampling and output limits.
    """

    architecture: Literal["mask_rcnn", "faster_rcnn"] = "mask_rcnn"
    backbone: str = "resnet50"
    num_classes: int | None = None
    context: Literal["gc", "se", "snl", "nl"] | None = None
    reduction: int | None = None
    stages: tuple[bool, bool, bool, bool] | None = None
    nonlocal_indices: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_source: Literal["torchvision", "mmdet"] = "torchvision"
    trainable_layers: int = 3
    frozen_bn: bool = True
    fpn_channels: int = 256
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100


@dataclass
class DetectionDataConfig:
    """COCO json + image folders and batching.

    Args:
        images, annotations: training image folder and instances json.
        val_images, val_annotations: evaluation data; None evaluates on the training images
            (an overfit check, not a held-out score).
        image_ids: use only these image ids (in this order), for training and for the default evaluation.
        max_images: use only the first N images (after the checks).
        category_mapping: "contiguous" (labels 1..K) or "coco_ids" (label = id; 91-class models).
        flip_prob: probability of the horizontal flip in training.
        aspect_ratio_group_factor: bins of torchvision's aspect-ratio grouping; 0 disables it.
        batch_size, eval_batch_size: images per training / evaluation batch.
        workers: DataLoader worker processes.
        on_corrupt: undecodable images are "skip"ped (reported by id) or stop the run ("error").
    """

    images: str = ""
    annotations: str = ""
    val_images: str | None = None
    val_annotations: str | None = None
    image_ids: tuple[int, ...] | None = None
    max_images: int | None = None
    category_mapping: Literal["contiguous", "coco_ids"] = "contiguous"
    flip_prob: float = 0.5
    aspect_ratio_group_factor: int = 3
    batch_size: int = 2
    eval_batch_size: int = 1
    workers: int = 0
    on_corrupt: Literal["skip", "error"] = "skip"


@dataclass
class DetectionTrainConfig:
    """Length of training, logging, evaluation and outputs.

    Args:
        epochs: passes over the training images.
        seed: seeds weights, data order and flips.
        device: "auto" (CUDA if available), "cpu" or "cuda".
        threads: torch intra-op threads; None leaves the default.
        out_dir: run folder: checkpoints/, steps.csv, metrics.csv, loss_curve.png, predictions.png, summary.json.
        max_steps_per_epoch: cut epochs short; None runs them whole.
        eval_every_epochs: COCO evaluation every N epochs; 0 only after the last.
        log_every_steps: log a loss line every N steps.
        picture_images: images drawn in predictions.png (0: no picture).
        picture_score_threshold: lowest score drawn.
    """

    epochs: int = 12
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    out_dir: str = "outputs/detection"
    max_steps_per_epoch: int | None = None
    eval_every_epochs: int = 0
    log_every_steps: int = 10
    picture_images: int = 4
    picture_score_threshold: float = 0.5


@dataclass
class DetectionConfig:
    """A whole detection run: task, model, data, optim, schedule and train sections."""

    task: Literal["detection"] = "detection"
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(**OPTIM_DEFAULTS))
    schedule: ScheduleConfig = field(
        default_factory=lambda: build_section(ScheduleConfig, dict(SCHEDULE_DEFAULTS), "schedule")
    )
    train: DetectionTrainConfig = field(default_factory=DetectionTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON safe, tuples as lists)."""
        return plain_data(dataclasses.asdict(self))


def detection_config_from_dict(data: dict[str, Any]) -> DetectionConfig:
    """Build and check a `DetectionConfig` from nested plain data (missing keys take their defaults)."""
    if not isinstance(data, dict):
        raise TypeError(f"a detection config must be a mapping, got {type(data).__name__}")
    if "task" not in data:
        raise ValueError(f"config key 'task': expected {TASK!r} (a detection config says task: detection)")
    merged = dict(data)
    for section, defaults in (("optim", OPTIM_DEFAULTS), ("schedule", SCHEDULE_DEFAULTS)):
        given = merged.get(section, {})
        if not isinstance(given, dict):
            raise TypeError(f"config key {section!r}: expected a mapping, got {type(given).__name__}")
        merged[section] = {**defaults, **given}
    config: DetectionConfig = build_section(DetectionConfig, merged)
    validate_detection_config(config)
    return config


def is_detection_config(path: str | Path) -> bool:
    """Whether the YAML file at `path` says `task: detection` (for `gcnet train` to dispatch on)."""
    return read_config_data(path).get("task") == TASK


def load_detection_config(path: str | Path, overrides: list[str] | None = None) -> DetectionConfig:
    """Read a YAML detection config, apply `--set section.key=value` overrides, check and return it."""
    return detection_config_from_dict(apply_overrides(read_config_data(path), list(overrides or [])))


def validate_detection_config(config: DetectionConfig) -> None:
    """Range and cross-field checks that types alone cannot express."""
    m, d, t = config.model, config.data, config.train
    positive = {
        "model.fpn_channels": m.fpn_channels,
        "model.max_size": m.max_size,
        "model.rpn_pre_nms_top_n_train": m.rpn_pre_nms_top_n_train,
        "model.rpn_post_nms_top_n_train": m.rpn_post_nms_top_n_train,
        "model.rpn_pre_nms_top_n_test": m.rpn_pre_nms_top_n_test,
        "model.rpn_post_nms_top_n_test": m.rpn_post_nms_top_n_test,
        "model.box_batch_size_per_image": m.box_batch_size_per_image,
        "model.box_detections_per_img": m.box_detections_per_img,
        "data.batch_size": d.batch_size,
        "data.eval_batch_size": d.eval_batch_size,
        "train.epochs": t.epochs,
        "train.log_every_steps": t.log_every_steps,
    }
    optional = {
        "model.reduction": m.reduction,
        "data.max_images": d.max_images,
        "train.threads": t.threads,
        "train.max_steps_per_epoch": t.max_steps_per_epoch,
    }
    for key, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
        if value < 1:
            raise ValueError(f"config key {key!r}: expected an integer >= 1, got {value}")
    if m.num_classes is not None and m.num_classes < 2:
        raise ValueError(
            f"config key 'model.num_classes': expected >= 2 (background + classes) or null, got {m.num_classes}"
        )
    if not m.min_size or any(s < 1 for s in m.min_size):
        raise ValueError(
            f"config key 'model.min_size': expected a list of positive ints, got {list(m.min_size)}"
        )
    if not 0 <= m.trainable_layers <= 5:
        raise ValueError(f"config key 'model.trainable_layers': expected 0..5, got {m.trainable_layers}")
    if m.reduction is not None and m.context is None:
        raise ValueError("config key 'model.reduction' is set but 'model.context' is null; name a block")
    for key, value in (("data.images", d.images), ("data.annotations", d.annotations)):
        if not value:
            raise ValueError(f"config key {key!r}: expected a path, got nothing")
    if (d.val_images is None) != (d.val_annotations is None):
        raise ValueError(
            "config keys 'data.val_images' and 'data.val_annotations' go together: set both or neither"
        )
    if not 0.0 <= d.flip_prob <= 1.0:
        raise ValueError(f"config key 'data.flip_prob': expected 0 <= value <= 1, got {d.flip_prob}")
    for key, value in (
        ("data.aspect_ratio_group_factor", d.aspect_ratio_group_factor),
        ("data.workers", d.workers),
        ("train.eval_every_epochs", t.eval_every_epochs),
        ("train.picture_images", t.picture_images),
    ):
        if value < 0:
            raise ValueError(f"config key {key!r}: expected an integer >= 0, got {value}")
    if config.optim.lr <= 0:
        raise ValueError(f"config key 'optim.lr': expected a value > 0, got {config.optim.lr}")
    if list(config.schedule.milestones) != sorted(config.schedule.milestones):
        raise ValueError(
            f"config key 'schedule.milestones': expected increasing epochs, got "
            f"{list(config.schedule.milestones)}"
        )
