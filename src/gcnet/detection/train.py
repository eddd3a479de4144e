"""Training and checkpoint evaluation of detectors from a `DetectionConfig`.

    for epoch: for grouped batch: losses = detector(images, targets) (RPN + box [+ mask] terms)
               sum -> backward -> clip -> SGD step -> lr step (per iteration)
               checkpoint last -> [COCO evaluation -> best]
    end: COCO evaluation, predictions.png, loss_curve.png, summary.json

Checkpoints use `gcnet.engine.checkpoint` (atomic folder + pointer, safetensors weights); the
config travels in the checkpoint so `evaluate_detection_checkpoint` rebuilds the model from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gcnet.detection.config import DetectionConfig, DetectionModelConfig, detection_config_from_dict
from gcnet.detection.data import (
    CocoDetection,
    GroupedBatchSampler,
    aspect_ratio_groups,
    collate_detection,
    detection_transforms,
)
from gcnet.detection.evaluate import DetectionEvaluation, draw_predictions, evaluate_detection
from gcnet.detection.models import Detector, build_detector, resnet_fpn_backbone
from gcnet.engine.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gcnet.engine.config import apply_overrides
from gcnet.engine.metrics import CsvLog, count_parameters, read_csv
from gcnet.engine.optim import build_optimizer, build_scheduler
from gcnet.engine.train import NonFiniteLossError

logger = logging.getLogger("gcnet.detection")

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
STEP_FIELDS = ["step", "epoch", "loss", *LOSS_NAMES, "lr", "time_s", "images"]


@dataclass
class DetectionTrainResult:
    """What `train_detection` did: per-step losses and times, the final evaluation, where things are."""

    out_dir: Path
    step_losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    evaluation: DetectionEvaluation | None = None
    parameters: int = 0
    trainable_parameters: int = 0
    seconds: float = 0.0
    skipped_image_ids: list[int] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        """Mean seconds per training iteration, the first (warm-up) one left out when there are more."""
        times = self.step_seconds[1:] or self.step_seconds
        return sum(times) / len(times) if times else 0.0


def build_detector_from_config(
    model: DetectionModelConfig, num_classes: int, load_weights: bool = True
) -> Detector:
    """The detector `model` describes; `load_weights=False` skips the backbone file (a checkpoint follows)."""
    backbone = resnet_fpn_backbone(
        model.backbone,
        context=model.context,
        reduction=model.reduction,
        stages=model.stages,
        nonlocal_indices=model.nonlocal_indices,
        backbone_options=model.backbone_options,
        weights=model.weights if load_weights else None,
        weights_source=model.weights_source,
        trainable_layers=model.trainable_layers,
        frozen_bn=model.frozen_bn,
        fpn_channels=model.fpn_channels,
    )
    return build_detector(
        model.architecture,
        backbone,
        num_classes,
        min_size=model.min_size,
        max_size=model.max_size,
        rpn_pre_nms_top_n_train=model.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=model.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=model.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=model.rpn_post_nms_top_n_test,
        box_batch_size_per_image=model.box_batch_size_per_image,
        box_score_thresh=model.box_score_thresh,
        box_detections_per_img=model.box_detections_per_img,
    )


def build_datasets(config: DetectionConfig) -> tuple[CocoDetection, CocoDetection]:
    """Training set (flips, crowd dropped) and evaluation set (the val files, else the training images)."""
    d = config.data
    masks = config.model.architecture == "mask_rcnn"
    train_set = CocoDetection(
        d.images,
        d.annotations,
        train=True,
        masks=masks,
        transform=detection_transforms(True, d.flip_prob),
        category_mapping=d.category_mapping,
        image_ids=d.image_ids,
        max_images=d.max_images,
        on_corrupt=d.on_corrupt,
    )
    if d.val_images is not None and d.val_annotations is not None:
        eval_source: dict[str, Any] = {"images": d.val_images, "annotations": d.val_annotations}
    else:
        logger.info(
            "no data.val_images: evaluating on the %d training images (an overfit check)", len(train_set)
        )
        eval_source = {"images": d.images, "annotations": d.annotations, "image_ids": train_set.image_ids}
    eval_set = CocoDetection(
        **eval_source,
        train=False,
        masks=masks,
        transform=detection_transforms(False),
        category_mapping=d.category_mapping,
        on_corrupt=d.on_corrupt,
    )
    if eval_set.label_to_category != train_set.label_to_category:
        raise ValueError(
            "training and evaluation annotations list different categories; labels would not match"
        )
    return train_set, eval_set


def _device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected one of ['auto', 'cpu', 'cuda']")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def plot_loss_curve(steps_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Total and per-term training loss against the step, from steps.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(steps_csv)
    if not rows:
        raise ValueError(f"{steps_csv} holds no steps to plot")
    steps = [int(r["step"]) for r in rows]
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("loss", *LOSS_NAMES):
        values = [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]
        if not all(math.isnan(v) for v in values):
            ax.plot(steps, values, label=name, linewidth=2.0 if name == "loss" else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    out_png = Path(out_png)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def train_detection(
    config: DetectionConfig, resume: bool = False, model: nn.Module | None = None
) -> DetectionTrainResult:
    """Train (or resume) the detection run `config` describes, then evaluate and draw it.

    Args:
        config: the whole run (`load_detection_config`).
        resume: continue from `<out_dir>/checkpoints/last.json` (epoch boundaries); without it an
            out_dir that already holds a checkpoint is refused rather than overwritten.
        model: a ready detector instead of building one from `config.model` (tests).

    Raises:
        NonFiniteLossError: a loss became NaN/inf; nothing is saved after the last good checkpoint.
    """
    if not isinstance(config, DetectionConfig):
        raise TypeError(
            f"config must be a DetectionConfig (load_detection_config), got {type(config).__name__}"
        )
    tc, dc = config.train, config.data
    out_dir = Path(tc.out_dir)
    if resume and not has_checkpoint(out_dir):
        raise ValueError(f"resume: no checkpoint in {out_dir}/checkpoints (expected last.json)")
    if not resume and has_checkpoint(out_dir):
        raise ValueError(f"{out_dir} already holds a checkpoint; resume it or choose another train.out_dir")
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    device = _device(tc.device)
    started = time.perf_counter()
    torch.manual_seed(tc.seed)

    train_set, eval_set = build_datasets(config)
    if len(train_set) == 0:
        raise ValueError(f"no usable training images in {dc.images} ({train_set.report.summary()})")
    num_classes = config.model.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise ValueError(
            f"model.num_classes={num_classes} is below the data's {train_set.num_classes} "
            f"(labels up to {train_set.num_classes - 1}, plus background)"
        )
    if model is None:
        model = build_detector_from_config(config.model, num_classes)
    model.to(device)
    sampler = GroupedBatchSampler(
        aspect_ratio_groups(train_set.aspect_ratios(), dc.aspect_ratio_group_factor),
        dc.batch_size,
        shuffle=True,
        seed=tc.seed,
    )
    loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=dc.workers, collate_fn=collate_detection
    )
    steps_per_epoch = min(len(sampler), tc.max_steps_per_epoch or len(sampler))
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, tc.epochs, steps_per_epoch)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_ap": None}
    if resume:
        ckpt = load_checkpoint(out_dir)
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        state.update(epoch=ckpt.state["epoch"], step=ckpt.state["step"], best_ap=ckpt.state["best_ap"])
        set_rng_state(ckpt.state["rng"])
        logger.info("resumed %s at epoch %d, step %d", ckpt.path, state["epoch"], state["step"])

    result = DetectionTrainResult(
        out_dir,
        parameters=count_parameters(model),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    logger.info(
        "%s %s: %d parameters (%d trainable), %d classes, %d training images, %d steps/epoch",
        config.model.architecture,
        config.model.backbone,
        result.parameters,
        result.trainable_parameters,
        num_classes,
        len(train_set),
        steps_per_epoch,
    )
    keep = state["step"] if resume else -1
    steps_log = CsvLog(out_dir / "steps.csv", STEP_FIELDS, keep_until_step=keep)
    eval_fields = ["epoch", "step"] + [
        f"{iou}_{n}" for iou in ("bbox", "segm") for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    ]
    metrics_log = CsvLog(out_dir / "metrics.csv", eval_fields, keep_until_step=keep)

    def checkpoint(pointers: tuple[str, ...]) -> None:
        save_checkpoint(
            out_dir,
            model,
            {
                "epoch": state["epoch"],
                "step": state["step"],
                "best_ap": state["best_ap"],
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "config": config.to_dict(),
                "num_classes": num_classes,
                "label_to_category": [[k, v] for k, v in sorted(train_set.label_to_category.items())],
            },
            pointers,
        )

    def run_evaluation(keep_outputs: int = 0) -> DetectionEvaluation:
        evaluation = evaluate_detection(
            model,
            eval_set,
            batch_size=dc.eval_batch_size,
            workers=dc.workers,
            device=device,
            keep_outputs=keep_outputs,
        )
        metrics_log.write(
            {
                "epoch": state["epoch"],
                "step": state["step"],
                **{k: v for k, v in evaluation.flat().items() if k in eval_fields},
            }
        )
        return evaluation

    evaluation: DetectionEvaluation | None = None
    try:
        for epoch in range(state["epoch"], tc.epochs):
            sampler.set_epoch(epoch)
            _train_epoch(
                config,
                model,
                loader,
                optimizer,
                scheduler,
                device,
                epoch,
                steps_per_epoch,
                state,
                result,
                steps_log,
            )
            state["epoch"] = epoch + 1
            pointers: tuple[str, ...] = ("last",)
            last = epoch + 1 == tc.epochs
            if (tc.eval_every_epochs and (epoch + 1) % tc.eval_every_epochs == 0) or last:
                evaluation = run_evaluation(tc.picture_images if last else 0)
                ap = evaluation.metrics["bbox"]["AP"] or 0.0
                if state["best_ap"] is None or ap > state["best_ap"]:
                    state["best_ap"] = ap
                    pointers = ("last", "best")
            checkpoint(pointers)
    finally:
        steps_log.close()
        metrics_log.close()
    if evaluation is None:  # resumed a finished run
        evaluation = run_evaluation(tc.picture_images)
    result.evaluation = evaluation
    if evaluation.kept:
        draw_predictions(
            evaluation.kept,
            out_dir / "predictions.png",
            eval_set.category_names,
            eval_set.label_to_category,
            tc.picture_score_threshold,
        )
    if (out_dir / "steps.csv").is_file() and read_csv(out_dir / "steps.csv"):
        plot_loss_curve(
            out_dir / "steps.csv",
            out_dir / "loss_curve.png",
            f"{config.model.architecture} {config.model.backbone}, {len(train_set)} images",
        )
    result.seconds = time.perf_counter() - started
    summary = {
        "evaluation": evaluation.to_dict(),
        "parameters": result.parameters,
        "trainable_parameters": result.trainable_parameters,
        "steps": state["step"],
        "seconds_per_step": result.seconds_per_step,
        "seconds": result.seconds,
        "first_loss": result.step_losses[0] if result.step_losses else None,
        "last_loss": result.step_losses[-1] if result.step_losses else None,
        "skipped_image_ids": sorted(set(result.skipped_image_ids)),
        "train_data": train_set.report.to_dict(),
        "eval_data": eval_set.report.to_dict(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _train_epoch(
    config: DetectionConfig,
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    steps_per_epoch: int,
    state: dict[str, Any],
    result: DetectionTrainResult,
    steps_log: CsvLog,
) -> None:
    tc = config.train
    model.train()
    batches = 0
    tick = time.perf_counter()
    for batch in loader:
        if batches >= steps_per_epoch:
            break
        batches += 1
        if batch.skipped:
            result.skipped_image_ids.extend(s.image_id for s in batch.skipped)
            logger.warning(
                "epoch %d: skipped unreadable images %s", epoch + 1, [s.image_id for s in batch.skipped]
            )
        if not batch.images:
            tick = time.perf_counter()
            continue
        images = [image.to(device) for image in batch.images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch.targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at epoch {epoch + 1}, step {state['step'] + 1} "
                f"({ {k: float(v.detach()) for k, v in losses.items()} }); stopped without saving. Lower optim.lr or set "
                "optim.grad_clip_norm."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.optim.grad_clip_norm
            )
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["step"] += 1
        seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        result.step_losses.append(value)
        result.step_seconds.append(seconds)
        steps_log.write(
            {
                "step": state["step"],
                "epoch": epoch + 1,
                "loss": repr(value),
                **{k: repr(float(losses[k].detach())) if k in losses else "" for k in LOSS_NAMES},
                "lr": lr,
                "time_s": f"{seconds:.4f}",
                "images": len(images),
            }
        )
        if state["step"] % tc.log_every_steps == 0:
            logger.info(
                "epoch %d step %d loss %.4f (%s) lr %.4g %.2fs/it",
                epoch + 1,
                state["step"],
                value,
                " ".join(f"{k[5:]} {float(v.detach()):.3f}" for k, v in losses.items()),
                lr,
                seconds,
            )


def is_detection_checkpoint(checkpoint: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint (run folder, pointer file or checkpoint folder) holds a `task: detection` run.

    For `gcnet eval` to dispatch on; reads only the small state file, not the weights.
    """
    from gcnet.engine.checkpoint import STATE, resolve_checkpoint

    state = torch.load(resolve_checkpoint(checkpoint) / STATE, map_location="cpu", weights_only=True)
    config = state.get("config") if isinstance(state, dict) else None
    return isinstance(config, dict) and config.get("task") == "detection"


def evaluate_detection_checkpoint(
    checkpoint: str | os.PathLike[str],
    images: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    *,
    overrides: list[str] | None = None,
    picture: str | os.PathLike[str] | None = None,
    max_images: int | None = None,
) -> DetectionEvaluation:
    """Rebuild a checkpoint's detector from its config, load its weights and COCO-evaluate it on a json + folder.

    Labels map to category ids as in the checkpoint's data (`category_mapping`); a json with other
    categories is refused. `picture` also draws the first images' predictions.
    """
    ckpt = load_checkpoint(checkpoint)
    config = detection_config_from_dict(apply_overrides(ckpt.state["config"], list(overrides or [])))
    model = build_detector_from_config(config.model, int(ckpt.state["num_classes"]), load_weights=False)
    model.load_state_dict(ckpt.model)
    dataset = CocoDetection(
        images,
        annotations,
        train=False,
        masks=config.model.architecture == "mask_rcnn",
        transform=detection_transforms(False),
        category_mapping=config.data.category_mapping,
        max_images=max_images,
        on_corrupt=config.data.on_corrupt,
    )
    trained = {int(k): int(v) for k, v in ckpt.state["label_to_category"]}
    if dataset.label_to_category != trained:
        raise ValueError(
            f"{annotations}: its categories map to labels differently from the checkpoint's data; "
            "evaluate on annotations with the same category list"
        )
    device = _device(config.train.device)
    model.to(device)
    keep = config.train.picture_images if picture is not None else 0
    evaluation = evaluate_detection(
        model,
        dataset,
        batch_size=config.data.eval_batch_size,
        workers=config.data.workers,
        device=device,
        keep_outputs=keep,
    )
    if picture is not None and evaluation.kept:
        draw_predictions(
            evaluation.kept,
            picture,
            dataset.category_names,
            dataset.label_to_category,
            config.train.picture_score_threshold,
        )
    return evaluation
