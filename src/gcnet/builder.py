"""The one place where a config becomes objects: the model or detector (with its pretrained weights),
the datasets and loaders, the optimizer and the schedule, and the task that the training loop runs.

    Config -> build_model -> create_model(name, context=..., reduction=...) [+ FPN and heads]
                          -> load_for_finetuning(model.weights)
           -> datasets (image folders, clip lists, COCO) -> MicroBatchSampler -> DataLoader
           -> ClassificationTask | DetectionTask -> optimizer, schedule -> gcnet.engine.loop.train
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from gcnet.config import Config, ConfigError, ModelConfig, OptimConfig, ScheduleConfig, apply_overrides, config_from_dict
from gcnet.data.image import IMAGE_EXTENSIONS, ImageFolderDataset, image_transform, scan_folder
from gcnet.data.sampling import MicroBatchSampler, SeededDataset
from gcnet.data.video import VideoClipDataset, video_samples
from gcnet.engine import distributed
from gcnet.engine.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, WEIGHTS
from gcnet.engine.classification import ClassificationTask
from gcnet.engine.evaluate import to_channels_last
from gcnet.engine.loop import RunParts, TrainResult
from gcnet.engine.loop import train as run_loop
from gcnet.engine.optim import lr_factor, parameter_groups
from gcnet.engine.task import Task
from gcnet.models import create_model, get_model_entry, load_for_finetuning
from gcnet.models.convert import NEW_BLOCK_MARKERS

logger = logging.getLogger("gcnet.build")

ModelArg = Union[nn.Module, Callable[[Config], nn.Module], None]


# -- models ------------------------------------------------------------------------------------
def model_options(model: ModelConfig) -> dict[str, Any]:
    """`create_model` keyword arguments of the model section: only what the config sets."""
    options: dict[str, Any] = {}
    context, between = model.context, model.nonlocal_blocks
    block_options = context.given()
    if context.block is not None:
        options["context"] = context.block
    if "reduction" in block_options:
        options["reduction"] = block_options.pop("reduction")
    if block_options:
        options["context_options"] = block_options
    for key in ("stages", "position"):
        if getattr(context, key) is not None:
            options[key] = getattr(context, key)
    if between.indices is not None:
        options["nonlocal_indices"] = between.indices
    if between.block is not None:
        options["nonlocal_block"] = between.block
    if between.given():
        preset = get_model_entry(model.name).defaults.get("nonlocal_options") or {}
        options["nonlocal_options"] = {**preset, **between.given()}
    for key in ("layout", "stem_pool_padding"):
        if getattr(model, key) is not None:
            options[key] = getattr(model, key)
    return options


def weights_file(path: str, source: str) -> Path:
    """The file `model.weights` names; a gcnet run or checkpoint folder resolves to its weights."""
    if source == "gcnet" and (Path(path).is_dir() or path.endswith(".json")):
        return resolve_checkpoint(path, "last") / WEIGHTS
    if not Path(path).is_file():
        raise ConfigError(f"config key 'model.weights': no file at {path!r}")
    return Path(path)


def load_weights(model: nn.Module, config: Config) -> None:
    """Load `model.weights` to fine-tune from; log what was loaded and what starts from init.

    A classifier created for another class count is initialised from the run's seed alone, so runs
    that differ only in their blocks start from the same head.
    """
    m = config.model
    if m.weights is None:
        return
    report = load_for_finetuning(model, weights_file(m.weights, m.weights_source), m.weights_source)
    new_head = [k.split(" ")[0] for k in report.mismatched]
    if new_head:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed + 2)
            for name, module in model.named_modules():
                if f"{name}.weight" in new_head and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    new_blocks = sorted({_block_of(k) for k in report.missing if k not in new_head})
    logger.info("fine-tuning from %s (%s): loaded %d tensors; from init: %d tensors of %d new blocks %s%s%s",
                m.weights, m.weights_source, len(model.state_dict()) - len(report.missing) - len(new_head),
                len(report.missing), len(new_blocks), new_blocks[:3] + (["..."] if len(new_blocks) > 3 else []),
                f"; a new classifier {new_head} for another class count" if new_head else "",
                f"; not used: {list(report.unexpected)}" if report.unexpected else "")


def _block_of(key: str) -> str:
    """The block a state-dict key belongs to: layer3.1.context.key.weight -> layer3.1.context."""
    for marker in NEW_BLOCK_MARKERS:
        if marker in key:
            head, tail = key.split(marker, 1)
            return head + marker + tail.split(".")[0] if marker == ".nonlocal_blocks." else head + marker[:-1]
    return key


def build_classifier(config: Config, num_classes: int) -> nn.Module:
    """The image or video classifier of the config, with its pretrained weights."""
    model = create_model(config.model.name, num_classes=num_classes, **model_options(config.model))
    load_weights(model, config)
    return model


def build_detector(config: Config, num_classes: int) -> nn.Module:
    """Mask / Faster R-CNN on the config's backbone; the heads are seeded apart from the backbone's blocks,
    so a block ablation changes only the blocks."""
    from gcnet.detection.models import build_detector as make_detector
    from gcnet.detection.models import fpn_backbone

    d = config.model.detector
    body = create_model(config.model.name, num_classes=0, **model_options(config.model))
    load_weights(body, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed + 1)
        backbone = fpn_backbone(body, trainable_layers=d.trainable_layers, frozen_bn=d.frozen_bn,
                                fpn_channels=d.fpn_channels)
        return make_detector(
            d.architecture, backbone, num_classes, min_size=d.min_size, max_size=d.max_size,
            rpn_pre_nms_top_n_train=d.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=d.rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=d.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=d.rpn_post_nms_top_n_test,
            box_batch_size_per_image=d.box_batch_size_per_image, box_score_thresh=d.box_score_thresh,
            box_detections_per_img=d.box_detections_per_img)


def build_model(config: Config, num_classes: int | None = None) -> nn.Module:
    """The classifier or detector the config describes; `num_classes` where the config leaves it to the data."""
    classes = config.model.num_classes or num_classes
    if classes is None:
        raise ConfigError("config key 'model.num_classes' is null and no data was given to count the classes")
    return build_detector(config, classes) if config.task == "detection" else build_classifier(config, classes)


# -- optimizer and schedule ----------------------------------------------------------------------
def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW; no weight decay on norms and biases unless asked."""
    groups = parameter_groups(model, config.weight_decay, config.decay_norm_and_bias)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig, epochs: int,
                    steps_per_epoch: int) -> LambdaLR:
    """A `LambdaLR` stepped after every optimizer step; its state dict is just the step count."""

    def factor(step: int) -> float:
        return lr_factor(step, steps_per_epoch, epochs, config.name, config.warmup_epochs,
                         config.warmup_start_factor, config.milestones, config.gamma, config.min_lr_factor)

    return LambdaLR(optimizer, factor)


# -- classification data --------------------------------------------------------------------------
@dataclass
class ClassificationData:
    """Datasets of a classification run; val and test are None when not configured."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]


def _hold_out(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of `samples` (seeded, so every rank and every resume agrees)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(fraction * len(samples)))
    return [samples[i] for i in sorted(order[held:])], [samples[i] for i in sorted(order[:held])]


def _classification_dataset(config: Config, samples: list[tuple[str, int]], classes: list[str],
                            train: bool) -> Dataset:
    d = config.data
    if config.task == "image":
        transform = image_transform(train, d.augment, d.image_size, d.mean, d.std)
        dataset = ImageFolderDataset(samples, classes, transform, d.on_corrupt, cache=d.cache)
        if d.cache:
            dataset.preload()
        return dataset
    return VideoClipDataset(samples, classes, clip_len=d.clip_len, stride=d.frame_stride, train=train,
                            num_clips=1 if train else d.eval_clips, crop=d.image_size, resize=d.resize,
                            mean=d.mean, std=d.std, on_corrupt=d.on_corrupt)


def _scan(config: Config, source: str, per_class: int | None) -> tuple[list[str], list[tuple[str, int]]]:
    if config.task == "image":
        return scan_folder(source, IMAGE_EXTENSIONS, per_class)
    return video_samples(source, per_class)


def build_eval_dataset(config: Config, source: str, annotations: str | None = None,
                       max_images: int | None = None, classes: Sequence[str] | None = None) -> Dataset:
    """An evaluation dataset (deterministic transforms) of `source` with the run's data settings.

    With the training `classes`, labels follow them by class name, so a folder that lacks a class
    or orders them otherwise still scores right; a class the model was not trained on is refused.
    """
    if config.task == "detection":
        if annotations is None:
            raise ConfigError(f"evaluating detection data at {source!r} needs its COCO annotations json")
        return _coco(config, source, annotations, train=False, max_images=max_images)
    found, samples = _scan(config, source, config.data.eval_per_class)
    if classes:
        used = sorted({label for _, label in samples})
        unknown = [found[label] for label in used if found[label] not in classes]
        if unknown:
            raise ValueError(f"{source}: classes {unknown} are not among the {len(classes)} the model was trained on "
                             f"({list(classes)[:10]}{' ...' if len(classes) > 10 else ''})")
        index = {name: i for i, name in enumerate(classes)}
        samples = [(path, index[found[label]]) for path, label in samples]
        found = list(classes)
    return _classification_dataset(config, samples, found, train=False)


def build_classification_data(config: Config) -> ClassificationData:
    """Train, validation (given, or held out of train by `val_fraction`) and test datasets."""
    d = config.data
    classes, samples = _scan(config, d.train, d.train_per_class)
    held = None
    if d.val is None and d.val_fraction > 0:
        samples, held = _hold_out(samples, d.val_fraction, config.train.seed)
    train = _classification_dataset(config, samples, classes, train=True)
    val = None
    if d.val is not None:
        val = build_eval_dataset(config, d.val, classes=classes)
    elif held is not None:
        val = _classification_dataset(config, held, classes, train=False)
    test = build_eval_dataset(config, d.test, classes=classes) if d.test is not None else None
    return ClassificationData(train, val, test, classes)


# -- detection data ------------------------------------------------------------------------------
def _coco(config: Config, images: str, annotations: str, train: bool, image_ids: Sequence[int] | None = None,
          max_images: int | None = None) -> Any:
    from gcnet.detection.data import CocoDetection, detection_transforms

    d = config.data
    return CocoDetection(images, annotations, train=train, masks=config.model.detector.architecture == "mask_rcnn",
                         transform=detection_transforms(train, d.flip_prob), category_mapping=d.category_mapping,
                         image_ids=image_ids, max_images=max_images, on_corrupt=d.on_corrupt)


def build_detection_data(config: Config) -> tuple[Any, Any, Any]:
    """Training set (flips, crowd dropped), evaluation set (val files, else the training images) and test set."""
    d = config.data
    train = _coco(config, d.train, d.train_annotations, True, d.image_ids, d.max_images)  # type: ignore[arg-type]
    if len(train) == 0:
        raise ValueError(f"no usable training images in {d.train} ({train.report.summary()})")
    if d.val is not None:
        val = _coco(config, d.val, d.val_annotations, False)  # type: ignore[arg-type]
    else:
        logger.info("no data.val: evaluating on the %d training images (an overfit check)", len(train))
        val = _coco(config, d.train, d.train_annotations, False, image_ids=train.image_ids)  # type: ignore[arg-type]
    test = _coco(config, d.test, d.test_annotations, False) if d.test is not None else None  # type: ignore[arg-type]
    for name, split in (("val", val), ("test", test)):
        if split is not None and split.label_to_category != train.label_to_category:
            raise ValueError(f"the {name} annotations list other categories than the training ones; labels would "
                             "not match")
    return train, val, test


# -- runs ----------------------------------------------------------------------------------------
def _given_model(model: ModelArg, config: Config) -> nn.Module | None:
    """A ready model or one built by the caller's function, with `model.weights` loaded; None without one."""
    if model is None:
        return None
    net = model if isinstance(model, nn.Module) else model(config)
    load_weights(net, config)
    return net


def build_task(config: Config, context: distributed.DistContext, model: ModelArg = None) -> Task:
    """The task of the config with its datasets and its model, on the context's device."""
    d, t = config.data, config.train
    if config.task == "detection":
        from gcnet.detection.task import DetectionTask

        train_set, val_set, test_set = build_detection_data(config)
        num_classes = config.model.num_classes or train_set.num_classes
        if num_classes < train_set.num_classes:
            raise ConfigError(f"config key 'model.num_classes': {num_classes} is below the data's "
                              f"{train_set.num_classes} (labels up to {train_set.num_classes - 1}, plus background)")
        net = _given_model(model, config) or build_detector(config, num_classes)
        net = _placed(net, config, context)
        return DetectionTask(net, train_set, val_set, test_set, num_classes, context.device, t.precision,
                             d.eval_batch_size or d.batch_size, d.workers, d.aspect_ratio_group_factor,
                             t.picture_images, t.picture_score_threshold)
    data = build_classification_data(config)
    num_classes = config.model.num_classes or len(data.classes)
    if num_classes < len(data.classes):
        raise ConfigError(f"config key 'model.num_classes': {num_classes} is below the {len(data.classes)} classes "
                          f"of {d.train} ({data.classes[:5]}{' ...' if len(data.classes) > 5 else ''})")
    net = _given_model(model, config) or build_classifier(config, num_classes)
    net = _placed(net, config, context)
    return ClassificationTask(net, data.train, data.val, data.test, data.classes, context.device, t.precision,
                              config.model.channels_last, t.label_smoothing, d.eval_batch_size or d.batch_size,
                              d.workers)


def _placed(model: nn.Module, config: Config, context: distributed.DistContext) -> nn.Module:
    if config.model.sync_batchnorm and context.distributed:
        model = distributed.convert_sync_batchnorm(model, context.device)
    model = model.to(context.device)
    return to_channels_last(model) if config.model.channels_last else model


def build_run(config: Config, context: distributed.DistContext, model: ModelArg = None) -> RunParts:
    """Everything the training loop needs: task, sampler and loader, optimizer and schedule."""
    d, t = config.data, config.train
    if d.batch_size % (context.world_size * t.accumulation_steps):  # before any data is read
        raise ConfigError(f"config key 'data.batch_size': {d.batch_size} does not split into {context.world_size} "
                          f"processes x {t.accumulation_steps} accumulation steps")
    task = build_task(config, context, model)
    train_set = SeededDataset(task.train_set, t.seed)
    sampler = MicroBatchSampler(len(train_set), d.batch_size, context.world_size, context.rank,
                                t.accumulation_steps, t.seed, task.groups)
    if sampler.steps == 0:
        raise ValueError(f"the training set ({len(train_set)} samples) gives no full batch of {d.batch_size}")
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=d.workers, collate_fn=task.collate,
                        pin_memory=context.device.type == "cuda")  # page-locked: copies overlap with compute
    steps = min(sampler.steps, t.max_steps_per_epoch or sampler.steps)
    optimizer = build_optimizer(task.model, config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, t.epochs, steps)
    return RunParts(task, sampler, loader, train_set, steps, optimizer, scheduler)


def train(config: Config, resume: bool = False, model: ModelArg = None, overwrite: bool = False) -> TrainResult:
    """Train (or `resume`) the run `config` describes, for any task, alone or under torchrun.

    `overwrite` replaces an earlier run in `train.out_dir` instead of refusing the folder.
    `model`: a ready module, or a function of the config building one, instead of the config's
    `model.name` (custom networks, tests); `model.weights` still loads into it.
    """
    return run_loop(config, lambda context: build_run(config, context, model), resume, overwrite)


# -- trained checkpoints ---------------------------------------------------------------------------
@dataclass
class Trained:
    """A checkpoint's model rebuilt from its own config, with its weights loaded."""

    model: nn.Module
    config: Config
    checkpoint: Checkpoint

    def eval_dataset(self, source: str, annotations: str | None = None, max_images: int | None = None) -> Dataset:
        """`build_eval_dataset` of `source` with this run's settings, labelled by its training classes."""
        return build_eval_dataset(self.config, source, annotations, max_images, self.checkpoint.state.get("classes"))


def load_trained(checkpoint: str | Path, overrides: Sequence[str] = (), model: nn.Module | None = None) -> Trained:
    """Rebuild the model a gcnet checkpoint was trained with (its config, `--set` overrides) and load it."""
    ckpt = load_checkpoint(checkpoint)
    data = apply_overrides(copy.deepcopy(ckpt.state["config"]), list(overrides))
    data.setdefault("model", {})["weights"] = None  # the checkpoint holds the weights
    data["model"].pop("weights_source", None)
    config = config_from_dict(data)
    num_classes = ckpt.state.get("num_classes") or len(ckpt.state.get("classes") or []) or None
    net = model if model is not None else build_model(config, num_classes)
    net.load_state_dict(ckpt.model)
    return Trained(net, config, ckpt)


def _evaluation_settings(config: Config, overrides: Sequence[str]) -> tuple[str, str]:
    """Device and precision to evaluate a checkpoint with: its run's, where they work on this machine.

    A run trained on CUDA is evaluated on the CPU where no GPU is present, and its fp16 (CUDA only)
    becomes fp32 there; a `train.device` or `train.precision` the caller sets is kept as given.
    """
    given = {item.split("=", 1)[0].strip() for item in overrides}
    device, precision = config.train.device, config.train.precision
    if device == "cuda" and "train.device" not in given and not torch.cuda.is_available():
        logger.info("the run trained on CUDA; none here: evaluating on the CPU")
        device = "cpu"
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if precision == "fp16" and on_cpu and "train.precision" not in given:
        logger.info("the run trained in fp16, which needs CUDA: evaluating in fp32 on the CPU")
        precision = "fp32"
    return device, precision


def evaluate_checkpoint(checkpoint: str | Path, data: str, overrides: Sequence[str] = (),
                        annotations: str | None = None, model: nn.Module | None = None,
                        max_images: int | None = None, picture: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on `data` (an image/clip folder or list, or COCO images + `annotations`).

    Detection only: `max_images` evaluates the first images, `picture` draws predictions into a PNG.
    """
    trained = load_trained(checkpoint, overrides, model)
    config, ckpt = trained.config, trained.checkpoint
    if config.task != "detection" and (annotations or picture or max_images):
        raise ConfigError(f"annotations, a picture and max_images apply to detection checkpoints; {ckpt.path} is "
                          f"a {config.task} checkpoint")
    if config.task == "detection" and annotations is None:
        root = Path(data)
        if not ((root / "images").is_dir() and (root / "annotations" / "instances.json").is_file()):
            raise ConfigError(f"{data!r} lacks images/ and annotations/instances.json; pass the image folder and "
                              "its COCO annotations json")
        data, annotations = str(root / "images"), str(root / "annotations" / "instances.json")
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    device, precision = _evaluation_settings(config, overrides)
    context = distributed.setup(device)
    try:
        net = trained.model.to(context.device)
        dataset = trained.eval_dataset(data, annotations, max_images)
        if config.task == "detection":
            from gcnet.detection.task import DetectionTask

            trained_map = {int(k): int(v) for k, v in ckpt.state["label_to_category"]}
            if dataset.label_to_category != trained_map:
                raise ValueError(f"{annotations}: its categories map to labels differently from the checkpoint's "
                                 "data; evaluate on annotations with the same category list")
            task: Task = DetectionTask(net, dataset, dataset, None, int(ckpt.state["num_classes"]), context.device,
                                       precision, config.data.eval_batch_size or 1, config.data.workers,
                                       0, config.train.picture_images, config.train.picture_score_threshold)
        else:
            task = ClassificationTask(net, dataset, dataset, None, ckpt.state.get("classes") or [], context.device,
                                      precision, config.model.channels_last, 0.0,
                                      config.data.eval_batch_size or config.data.batch_size, config.data.workers)
        metrics = task.evaluate(net, "val", context, final=picture is not None) or {}
        if picture is not None and config.task == "detection" and context.is_main:
            task.picture(Path(picture))  # type: ignore[attr-defined]
    finally:
        distributed.cleanup(context)
    metrics.update(checkpoint=str(ckpt.path), epoch=ckpt.state["epoch"], step=ckpt.state["step"])
    return metrics


__all__ = [
    "ClassificationData",
    "Trained",
    "build_classification_data",
    "build_detection_data",
    "build_eval_dataset",
    "build_model",
    "build_optimizer",
    "build_run",
    "build_scheduler",
    "build_task",
    "evaluate_checkpoint",
    "load_trained",
    "model_options",
    "train",
]
