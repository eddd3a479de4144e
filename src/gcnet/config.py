"""One run configuration for every task: typed dataclasses read from YAML, checked key by key at load.

    task: image | video | detection
    model:    name, num_classes, context {block, reduction, ...}, nonlocal_blocks {indices, ...},
              weights, weights_source, channels_last, compile, sync_batchnorm, detector {...}
    data:     train, val, test (+ *_annotations for detection), batch sizes, workers, transforms
    optim, schedule, train: the same for every task

Unknown keys, values of the wrong type or range, block options the chosen block does not take and
keys of another task raise `ConfigError` naming the dotted key and what is allowed there, before
any data is read. Modules below the builder (blocks, models, data) never see these classes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

Task = Literal["image", "video", "detection"]
TASKS: tuple[str, ...] = typing.get_args(Task)
BlockName = Literal["gc", "snl", "se", "nl"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def data_root() -> Path:
    """Where the shared data sets live: $GCNET_DATA, else ../shared/data from the working directory."""
    return Path(os.environ.get("GCNET_DATA", "../shared/data"))


class ConfigError(ValueError):
    """A config file, key or value is not what gcnet accepts; the message names it and what is allowed."""


def _only(*tasks: str) -> dict[str, Any]:
    """Field metadata: the key belongs to these tasks; setting it for another task is an error."""
    return {"tasks": tasks}


CLASSIFICATION = _only("image", "video")
VIDEO = _only("video")
DETECTION = _only("detection")


@dataclass
class BlockOptions:
    """Options of a context block; null keeps the block's default (or a named model's preset).

    Args:
        reduction: bottleneck divisor r (GC, SE; NL's inner channels C / r).
        pooling, fusion, norm, relu: GC framework options (`GlobalContext`).
        mode, subsample, scale: non-local options (`NonLocal`); norm is also NL's BN on W_z.
        hidden_channels, norm_eps: GC's bottleneck width given directly (instead of C // reduction)
            and its LayerNorm eps (timm's checkpoints: rounded widths, eps 1e-6).
        subsample_at: where NL max-pools: "projections" (paper) or "input" (released code).
    """

    reduction: int | None = None
    pooling: Literal["attention", "average"] | None = None
    fusion: Literal["add", "scale", "both"] | None = None
    norm: bool | None = None
    relu: bool | None = None
    mode: Literal["gaussian", "embedded_gaussian", "dot_product", "concatenation"] | None = None
    subsample: bool | None = None
    scale: Literal["none", "inner", "channels"] | float | None = None
    hidden_channels: int | None = None
    norm_eps: float | None = None
    subsample_at: Literal["projections", "input"] | None = None

    def given(self) -> dict[str, Any]:
        """The options that are set, by the block constructors' argument names."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(BlockOptions)
                if getattr(self, f.name) is not None}


@dataclass
class ContextConfig(BlockOptions):
    """A context block inside residual blocks (`model.context`; a bare name such as `gc` is short for it).

    Args:
        block: "gc", "snl", "se", "nl", or null for the named model's preset (none for plain backbones).
        stages: one flag per stage (c2..c5; CIFAR ResNets have three) for blocks that get one.
        position: "before_add" (the papers'), "after_3x3" or "after_add".
    """

    SHORTHAND: typing.ClassVar[str] = "block"

    block: BlockName | None = None
    stages: tuple[bool, ...] | None = None
    position: Literal["before_add", "after_3x3", "after_add"] | None = None


@dataclass
class NonLocalConfig(BlockOptions):
    """Blocks placed between residual blocks (`model.nonlocal_blocks`), the NL paper's placement.

    Args:
        indices: per stage, the residual blocks followed by one block, e.g. [[], [1], [1]].
        block: the block placed there; null means "nl".
    """

    indices: tuple[tuple[int, ...], ...] | None = None
    block: BlockName | None = None


@dataclass
class DetectorConfig:
    """torchvision's Mask / Faster R-CNN around the backbone (`model.detector`, task detection).

    Args:
        architecture: "mask_rcnn" or "faster_rcnn".
        trainable_layers, frozen_bn: torchvision's freezing (3 and frozen BN for pretrained backbones).
        fpn_channels: FPN width (256 in the papers).
        min_size, max_size: short side(s) images are resized to (random choice in training), long-side cap.
        rpn_*, box_*: proposal counts, RoI sampling and output limits.
    """

    architecture: Literal["mask_rcnn", "faster_rcnn"] = "mask_rcnn"
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
class ModelConfig:
    """Which network to build, where its blocks go, which weights it starts from.

    Args:
        name: a registered model (`gcnet.list_models()`); the backbone for detection.
        num_classes: classifier outputs (detection: including background); null takes them from the data.
        context: block in every residual block of the chosen stages.
        nonlocal_blocks: blocks between residual blocks.
        weights, weights_source: checkpoint to start from and its layout ("torchvision", "mmdet",
            "timm", "caffe2" (the Non-local paper's .pkl), "mmaction2", or "gcnet": a gcnet run
            folder, checkpoint folder or .safetensors file).
            New blocks and a head for another class count start from their init; any other
            unmatched key stops the run. Detection loads them into the backbone.
        channels_last: NHWC (NDHWC for video) memory format.
        compile: wrap the model in `torch.compile`.
        sync_batchnorm: BatchNorm statistics over the global batch under torchrun.
        layout, stem_pool_padding: a C2D / I3D net's temporal layout ("8x8", "paper", "mmaction2")
            and its pool1 padding (0 as the released Caffe2 code); null keeps the model's own.
        detector: the detection heads (task detection only).
    """

    name: str = "cifar_resnet20"
    num_classes: int | None = None
    context: ContextConfig = field(default_factory=ContextConfig)
    nonlocal_blocks: NonLocalConfig = field(default_factory=NonLocalConfig)
    weights: str | None = None
    weights_source: Literal["torchvision", "mmdet", "timm", "gcnet", "caffe2", "mmaction2"] = "torchvision"
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False
    layout: Literal["paper", "8x8", "mmaction2"] | None = field(default=None, metadata=VIDEO)
    stem_pool_padding: int | None = field(default=None, metadata=VIDEO)
    detector: DetectorConfig = field(default_factory=DetectorConfig, metadata=DETECTION)


@dataclass
class DataConfig:
    """Where the data is and how batches are made.

    Args:
        train, val, test: image folders (`<class>/<file>`), video folders or `path label` list files,
            or COCO image folders (detection); val and test are optional. Detection without val
            evaluates on the training images (an overfit check).
        train_annotations, val_annotations, test_annotations: COCO instances json (detection).
        batch_size: global batch, split evenly over processes and accumulation steps.
        eval_batch_size: global evaluation batch; null uses batch_size.
        workers: DataLoader worker processes per process.
        on_corrupt: "skip" (report the path, go on) or "error" (stop naming the path).
        val_fraction: share of `train` held out for validation when `val` is not given.
        train_per_class, eval_per_class: keep only the first N files of each class.
        image_size: training crop size.
        augment: "cifar" (pad-4 crop, flip), "imagenet" (random resized crop, flip) or "none".
        mean, std: per-channel normalisation in [0, 1] units.
        cache: keep decoded images in memory.
        clip_len, frame_stride, eval_clips, resize: frames per clip, step between them, clips
            averaged per video at evaluation, short side frames are resized to (video).
        image_ids, max_images: keep only these COCO image ids / the first N images (detection).
        category_mapping: "contiguous" labels 1..K or "coco_ids" (label = id; 91-class models).
        flip_prob: horizontal flip probability in training (detection).
        aspect_ratio_group_factor: batches share an aspect-ratio bin; 0 disables it (detection).
    """

    train: str = ""
    val: str | None = None
    test: str | None = None
    train_annotations: str | None = field(default=None, metadata=DETECTION)
    val_annotations: str | None = field(default=None, metadata=DETECTION)
    test_annotations: str | None = field(default=None, metadata=DETECTION)
    batch_size: int = 128
    eval_batch_size: int | None = None
    workers: int = 0
    on_corrupt: Literal["skip", "error"] = "skip"
    val_fraction: float = field(default=0.0, metadata=CLASSIFICATION)
    train_per_class: int | None = field(default=None, metadata=CLASSIFICATION)
    eval_per_class: int | None = field(default=None, metadata=CLASSIFICATION)
    image_size: int = field(default=32, metadata=CLASSIFICATION)
    augment: Literal["cifar", "imagenet", "none"] = field(default="cifar", metadata=_only("image"))
    mean: tuple[float, float, float] = field(default=CIFAR_MEAN, metadata=CLASSIFICATION)
    std: tuple[float, float, float] = field(default=CIFAR_STD, metadata=CLASSIFICATION)
    cache: bool = field(default=False, metadata=_only("image"))
    clip_len: int = field(default=8, metadata=VIDEO)
    frame_stride: int = field(default=2, metadata=VIDEO)
    eval_clips: int = field(default=3, metadata=VIDEO)
    resize: int | None = field(default=None, metadata=VIDEO)
    image_ids: tuple[int, ...] | None = field(default=None, metadata=DETECTION)
    max_images: int | None = field(default=None, metadata=DETECTION)
    category_mapping: Literal["contiguous", "coco_ids"] = field(default="contiguous", metadata=DETECTION)
    flip_prob: float = field(default=0.5, metadata=DETECTION)
    aspect_ratio_group_factor: int = field(default=3, metadata=DETECTION)


@dataclass
class OptimConfig:
    """Optimizer, weight decay and gradient clipping.

    Args:
        name: "sgd" (with momentum) or "adamw".
        lr: peak learning rate (after warmup).
        momentum, nesterov: SGD momentum.
        betas: AdamW betas.
        weight_decay: decoupled for AdamW, L2 for SGD.
        decay_norm_and_bias: also decay normalisation weights and biases (off by default).
        grad_clip_norm: clip the global gradient norm to this value; null disables.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    grad_clip_norm: float | None = None


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped every iteration.

    Args:
        name: "cosine" (to min_lr_factor * lr), "step" (times gamma at each milestone) or "constant".
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        warmup_start_factor: lr factor at the first step of warmup.
        milestones: epochs at which "step" multiplies the lr by gamma.
        gamma: factor of "step".
        min_lr_factor: final lr of "cosine" as a fraction of lr.
    """

    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_factor: float = 0.0


@dataclass
class TrainConfig:
    """Length of training, numerics, logging, evaluation and checkpoints.

    Args:
        epochs: number of epochs.
        seed: seeds weights, data order, augmentation and the model's own sampling.
        accumulation_steps: split each process's share of a batch into this many forward/backward
            passes before one optimizer step (the same global batch on fewer devices).
        label_smoothing: cross-entropy label smoothing (classification).
        precision: "fp32", "bf16" (autocast on CPU or CUDA) or "fp16" (CUDA, with loss scaling).
        device: "auto" (CUDA if available), "cpu" or "cuda".
        deterministic: only deterministic algorithms (`torch.use_deterministic_algorithms`), so that
            a CUDA run repeats its losses when run again or resumed; an op without a deterministic
            kernel then raises (e.g. torchvision's RoIAlign backward on CUDA). CPU runs repeat already.
        threads: torch intra-op threads; null leaves the default.
        allocator: "retained" keeps freed memory in the process (glibc; no page faults on every
            step's large buffers), "system" leaves malloc as it is (also when jemalloc or tcmalloc
            is preloaded, which is then used either way).
        out_dir: run folder for checkpoints, metrics.csv, steps.csv, curves.
        max_steps_per_epoch: cut epochs short (smoke runs); null runs them whole.
        checkpoint_every_steps: also checkpoint inside epochs every N steps; 0 only at epoch ends.
        eval_every_epochs: validate every N epochs and after the last; 0 only after the last.
        log_every_steps: a loss line in the log every N steps; 0 only per epoch.
        tensorboard: also write TensorBoard events to out_dir/tb.
        progress: a tqdm progress bar on a terminal.
        plot: save the curves PNG at the end.
        picture_images, picture_score_threshold: predictions drawn in predictions.png (detection).
    """

    epochs: int = 30
    seed: int = 0
    accumulation_steps: int = 1
    label_smoothing: float = field(default=0.0, metadata=CLASSIFICATION)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False
    threads: int | None = None
    allocator: Literal["retained", "system"] = "retained"
    out_dir: str = "outputs/run"
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int = 0
    eval_every_epochs: int = 1
    log_every_steps: int = 0
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True
    picture_images: int = field(default=4, metadata=DETECTION)
    picture_score_threshold: float = field(default=0.5, metadata=DETECTION)


@dataclass
class Config:
    """A whole run: task, model, data, optim, schedule and train sections."""

    task: Task = "image"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON safe, tuples as lists) of the keys that apply to the task."""
        data = plain_data(dataclasses.asdict(self))
        for section in dataclasses.fields(self):
            if section.name != "task":
                for key in dataclasses.fields(getattr(self, section.name)):
                    tasks = key.metadata.get("tasks")
                    if tasks and self.task not in tasks:
                        del data[section.name][key.name]
        return data


# Defaults that differ by task: torchvision's and mmdetection's "1x" detection recipe.
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "detection": {
        "optim": {"lr": 0.02, "weight_decay": 1e-4},
        "schedule": {"name": "step", "milestones": [8, 11], "warmup_start_factor": 0.001},
        "data": {"batch_size": 2, "eval_batch_size": 1},
        "train": {"epochs": 12, "eval_every_epochs": 0},
    },
}


def plain_data(value: Any) -> Any:
    """Nested dataclass-as-dict data with tuples as lists (YAML/JSON safe)."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists to tuples, int to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(key, option, value)
            except ConfigError:
                pass
        raise _mismatch(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        if shorthand is not None and (value is None or isinstance(value, str)):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise _mismatch(key, tp, value)
        return build_section(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_convert(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
            return float(value)
        raise _mismatch(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(key, tp, value)
    raise TypeError(f"config key {key!r}: unsupported annotation {tp!r}")  # a bug in this module


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass `cls` from plain data; unknown keys and wrong types raise naming `prefix.key`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"in {prefix!r}" if prefix else "at the top level"
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key {dotted!r}; allowed keys {where}: {names}")
    values = {k: _convert(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    return cls(**values)


def _check_task_keys(data: dict[str, Any], task: str) -> None:
    """Keys given for another task (e.g. data.clip_len in a detection config) are mistakes."""
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        given = data.get(section.name)
        if section.name == "task" or not isinstance(given, dict):
            continue
        for key in dataclasses.fields(hints[section.name]):
            tasks = key.metadata.get("tasks")
            if tasks and key.name in given and task not in tasks:
                raise ConfigError(f"config key '{section.name}.{key.name}' applies to task {' or '.join(tasks)}, "
                                  f"not {task!r}; remove it")


def _merge(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in given.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and check a `Config` from nested plain data (missing keys take the task's defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections {[f.name for f in dataclasses.fields(Config)]}, "
                          f"got {type(data).__name__}")
    task = data.get("task", "image")
    if task not in TASKS:
        raise ConfigError(f"config key 'task': expected one of {list(TASKS)}, got {task!r}")
    for name, section in data.items():
        if name != "task" and not isinstance(section, dict) and name in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"config key {name!r}: expected a mapping of keys, got {type(section).__name__} "
                              f"{section!r}")
    _check_task_keys(data, task)
    config: Config = build_section(Config, _merge(TASK_DEFAULTS.get(task, {}), data))
    validate(config)
    return config


class _Loader(yaml.SafeLoader):
    """YAML 1.1 SafeLoader that also reads 1e-4 and 1e6 as numbers, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*[eE][-+]?\d+$|^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
               r"|^\.[0-9_]+(?:[eE][-+][0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_value(text: str, where: str) -> Any:
    """One YAML value (a `--set` right-hand side); an empty string is null."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not a YAML value: {error}".replace("\n", " ")) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to nested plain data, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. optim.lr=0.05), got {item!r}")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts) or (len(parts) < 2 and parts[0] != "task"):
            raise ConfigError(f"--set key must be section.key (e.g. train.epochs), got {dotted!r}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if isinstance(child, str) and part == "context":  # `context: gc` shorthand, then a field of it
                child = node[part] = {"block": child}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_value(raw, f"--set {dotted}")
    return data


def resolve_config_path(path: str | Path) -> Path:
    """A config file: an existing path, or the name of a config shipped with gcnet (`gcnet configs`)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    name = str(path).removesuffix(".yaml")
    for bundled in (BUNDLED_CONFIGS / f"{name}.yaml", BUNDLED_CONFIGS / name.removeprefix("configs/")):
        if bundled.is_file():
            return bundled
        if bundled.with_suffix(".yaml").is_file():
            return bundled.with_suffix(".yaml")
    raise ConfigError(f"config file {str(path)!r} does not exist and is not one of gcnet's configs "
                      f"{bundled_configs()}")


def bundled_configs() -> list[str]:
    """Names of the configs shipped inside the package, e.g. 'cifar10_resnet20', 'detection/coco128_r18_overfit'."""
    return sorted(str(p.relative_to(BUNDLED_CONFIGS).with_suffix("")) for p in BUNDLED_CONFIGS.rglob("*.yaml"))


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path` (a file or a shipped config name); errors name the file."""
    path = resolve_config_path(path)
    try:
        text = path.read_text()
        data = yaml.load(text, Loader=_Loader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected a YAML config)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--set` overrides, check everything and return the `Config`."""
    data = read_config_data(path)
    try:
        return config_from_dict(apply_overrides(data, list(overrides or [])))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _check_block_options(key: str, block: str | None, options: BlockOptions) -> None:
    from gcnet.blocks import CONTEXT_BLOCKS

    given = options.given()
    if block is None:
        if given:
            raise ConfigError(f"config keys {[f'{key}.{k}' for k in given]} set options but {key!r} names no block; "
                              f"set {key}.block to one of {sorted(CONTEXT_BLOCKS)}")
        return
    valid = [p for p in inspect.signature(CONTEXT_BLOCKS[block]).parameters if p != "channels"]
    for name in given:
        if name not in valid:
            raise ConfigError(f"config key '{key}.{name}': block {block!r} has no option {name!r}; "
                              f"its options are {valid}")


def _check_model(config: Config) -> None:
    from gcnet.models import get_model_entry, list_models

    m = config.model
    try:
        preset = get_model_entry(m.name).defaults
    except ValueError as error:
        raise ConfigError(f"config key 'model.name': {error}") from None
    if config.task == "detection" and not m.name.startswith(("resnet", "resnext")):
        raise ConfigError(f"config key 'model.name': detection needs a ResNet/ResNeXt backbone, got {m.name!r}; "
                          f"expected one of {list_models('res*')}")
    context_block = m.context.block or preset.get("context")
    _check_block_options("model.context", context_block if isinstance(context_block, str) else None, m.context)
    if context_block is None and (m.context.stages is not None or m.context.position is not None):
        raise ConfigError("config keys 'model.context.stages'/'position' are set but no block is named; "
                          "set model.context.block")
    indices = m.nonlocal_blocks.indices or preset.get("nonlocal_indices")
    if indices is None or not any(indices):
        if m.nonlocal_blocks.block is not None or m.nonlocal_blocks.given():
            raise ConfigError("config key 'model.nonlocal_blocks' sets a block or options without "
                              "'model.nonlocal_blocks.indices' (e.g. [[], [1], [1]])")
    else:
        _check_block_options("model.nonlocal_blocks", m.nonlocal_blocks.block or "nl", m.nonlocal_blocks)
    from gcnet.models.registry import accepted_options

    for key in ("layout", "stem_pool_padding"):
        if getattr(m, key) is not None and key not in accepted_options(get_model_entry(m.name).builder):
            raise ConfigError(f"config key 'model.{key}': model {m.name!r} has no such option "
                              f"(C2D / I3D models take it)")
    if m.stem_pool_padding not in (None, 0, 1):
        raise ConfigError("config key 'model.stem_pool_padding': expected 0, 1 or null, "
                          f"got {m.stem_pool_padding!r}")
    if m.weights_source in ("caffe2", "mmaction2") and config.task != "video":
        raise ConfigError(f"config key 'model.weights_source': {m.weights_source!r} checkpoints are video "
                          f"models (task video), not {config.task!r}")
    if m.weights_source != "torchvision" and m.weights is None:
        raise ConfigError(f"config key 'model.weights_source' is {m.weights_source!r} but 'model.weights' is null")
    minimum = 2 if config.task == "detection" else 1
    if m.num_classes is not None and m.num_classes < minimum:
        raise ConfigError(f"config key 'model.num_classes': expected >= {minimum}"
                          f"{' (background + classes)' if minimum == 2 else ''} or null, got {m.num_classes}")


def validate(config: Config) -> None:
    """Range and cross-field checks that types alone cannot express; the same for every task."""
    d, t, o, s, det = config.data, config.train, config.optim, config.schedule, config.model.detector
    at_least_one = {
        "data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size,
        "data.image_size": d.image_size, "data.clip_len": d.clip_len, "data.frame_stride": d.frame_stride,
        "data.eval_clips": d.eval_clips, "data.train_per_class": d.train_per_class,
        "data.eval_per_class": d.eval_per_class, "data.resize": d.resize, "data.max_images": d.max_images,
        "train.epochs": t.epochs, "train.accumulation_steps": t.accumulation_steps, "train.threads": t.threads,
        "train.max_steps_per_epoch": t.max_steps_per_epoch, "model.context.reduction": config.model.context.reduction,
        "model.nonlocal_blocks.reduction": config.model.nonlocal_blocks.reduction,
        "model.context.hidden_channels": config.model.context.hidden_channels,
        "model.detector.fpn_channels": det.fpn_channels, "model.detector.max_size": det.max_size,
        "model.detector.rpn_pre_nms_top_n_train": det.rpn_pre_nms_top_n_train,
        "model.detector.rpn_post_nms_top_n_train": det.rpn_post_nms_top_n_train,
        "model.detector.rpn_pre_nms_top_n_test": det.rpn_pre_nms_top_n_test,
        "model.detector.rpn_post_nms_top_n_test": det.rpn_post_nms_top_n_test,
        "model.detector.box_batch_size_per_image": det.box_batch_size_per_image,
        "model.detector.box_detections_per_img": det.box_detections_per_img,
    }
    for key, value in at_least_one.items():
        if value is not None and value < 1:
            raise ConfigError(f"config key {key!r}: expected an integer >= 1, got {value}")
    at_least_zero = {
        "data.workers": d.workers, "data.aspect_ratio_group_factor": d.aspect_ratio_group_factor,
        "train.checkpoint_every_steps": t.checkpoint_every_steps, "train.eval_every_epochs": t.eval_every_epochs,
        "train.log_every_steps": t.log_every_steps, "train.picture_images": t.picture_images,
        "train.seed": t.seed,
    }
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"config key {key!r}: expected an integer >= 0, got {value}")
    fractions = {"data.val_fraction": (d.val_fraction, False), "train.label_smoothing": (t.label_smoothing, False),
                 "data.flip_prob": (d.flip_prob, True), "schedule.min_lr_factor": (s.min_lr_factor, True),
                 "schedule.warmup_start_factor": (s.warmup_start_factor, True),
                 "model.detector.box_score_thresh": (det.box_score_thresh, True),
                 "train.picture_score_threshold": (t.picture_score_threshold, True)}
    for key, (value, closed) in fractions.items():
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            raise ConfigError(f"config key {key!r}: expected 0 <= value {'<=' if closed else '<'} 1, got {value}")
    positive = {"optim.lr": o.lr, "optim.grad_clip_norm": o.grad_clip_norm, "schedule.gamma": s.gamma,
                "model.context.norm_eps": config.model.context.norm_eps}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"config key {key!r}: expected a value > 0{' or null' if 'clip' in key else ''}, "
                              f"got {value}")
    for key, value in {"optim.weight_decay": o.weight_decay, "optim.momentum": o.momentum,
                       "schedule.warmup_epochs": s.warmup_epochs}.items():
        if value < 0:
            raise ConfigError(f"config key {key!r}: expected a value >= 0, got {value}")
    if list(s.milestones) != sorted(s.milestones) or any(m < 0 for m in s.milestones):
        raise ConfigError(f"config key 'schedule.milestones': expected increasing epochs >= 0, got {list(s.milestones)}")
    if not det.min_size or any(size < 1 for size in det.min_size):
        raise ConfigError(f"config key 'model.detector.min_size': expected a list of positive ints, "
                          f"got {list(det.min_size)}")
    if not 0 <= det.trainable_layers <= 5:
        raise ConfigError(f"config key 'model.detector.trainable_layers': expected 0..5, got {det.trainable_layers}")
    if d.batch_size % t.accumulation_steps:
        raise ConfigError(f"config key 'data.batch_size': {d.batch_size} does not split into "
                          f"train.accumulation_steps={t.accumulation_steps} equal parts")
    if not d.train:
        raise ConfigError("config key 'data.train': expected a folder or list file, got nothing")
    if config.task == "detection":
        for split in ("train", "val", "test"):
            if (getattr(d, split) is None) != (getattr(d, f"{split}_annotations") is None) or (
                    split == "train" and d.train_annotations is None):
                raise ConfigError(f"config keys 'data.{split}' and 'data.{split}_annotations' go together "
                                  f"(an image folder and its COCO json); set both"
                                  f"{'' if split == 'train' else ' or neither'}")
    _check_model(config)
