"""Training configuration: typed dataclasses loaded from YAML, checked key by key.

Unknown keys and values of the wrong type raise `ValueError`/`TypeError` naming the dotted key
(`optim.name`) and what is allowed there, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class ModelConfig:
    """Which network to build and how to run it.

    Args:
        name: a name known to `gcnet.models.create_model`.
        num_classes: outputs of the classifier.
        context: context block inserted by the model: None, "se", "gc", "snl" or "nl".
        options: further keyword arguments of `create_model` (it rejects unknown ones).
        channels_last: NHWC (NDHWC for video) memory format for weights and inputs.
        compile: wrap the model in `torch.compile`.
        sync_batchnorm: convert BatchNorm to SyncBatchNorm under torchrun.
    """

    name: str = "cifar_resnet20"
    num_classes: int = 10
    context: Literal["se", "gc", "snl", "nl"] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False


@dataclass
class DataConfig:
    """Where the data is and how batches are made.

    Args:
        kind: "image" (ImageFolder) or "video" (clip folders or `path label` list files).
        train, val, test: folders (`<class>/<file>`) or, for video, list files; val/test optional.
        val_fraction: share of `train` held out for validation when `val` is not given.
        train_per_class, eval_per_class: keep only the first N files of each class (subsets).
        image_size: training crop size (frames for video).
        augment: "cifar" (pad-4 crop, flip), "imagenet" (random resized crop, flip) or "none".
        mean, std: per-channel normalisation in [0, 1] units.
        batch_size: global batch, split evenly across processes.
        eval_batch_size: global evaluation batch; defaults to batch_size.
        workers: DataLoader worker processes per process.
        cache: keep decoded images in memory (small data sets).
        on_corrupt: "skip" (report the path, count, go on) or "error" (stop with the path).
        clip_len, frame_stride: frames T per clip and the step s between them (video).
        eval_clips: clips per video at evaluation, whose scores are averaged (video).
        resize: short side frames are resized to before cropping (video); None keeps the size.
    """

    kind: Literal["image", "video"] = "image"
    train: str = ""
    val: str | None = None
    test: str | None = None
    val_fraction: float = 0.0
    train_per_class: int | None = None
    eval_per_class: int | None = None
    image_size: int = 32
    augment: Literal["cifar", "imagenet", "none"] = "cifar"
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    batch_size: int = 128
    eval_batch_size: int | None = None
    workers: int = 0
    cache: bool = False
    on_corrupt: Literal["skip", "error"] = "skip"
    clip_len: int = 8
    frame_stride: int = 2
    eval_clips: int = 3
    resize: int | None = None


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
        grad_clip_norm: clip the global gradient norm to this value; None disables.
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
    """Length of training, numerics, logging and checkpoints.

    Args:
        epochs: number of epochs.
        seed: seeds weights, data order and augmentation.
        label_smoothing: cross-entropy label smoothing.
        precision: "fp32", "bf16" (autocast on CPU or CUDA) or "fp16" (CUDA, with loss scaling).
        device: "auto" (CUDA if available), "cpu" or "cuda".
        threads: torch intra-op threads; None leaves the default.
        out_dir: run folder for checkpoints, metrics.csv, steps.csv, curves.png.
        max_steps_per_epoch: cut epochs short (smoke runs); None runs the full epoch.
        checkpoint_every_steps: also checkpoint inside epochs every N steps; 0 only at epoch ends.
        eval_every_epochs: validate every N epochs (and after the last).
        tensorboard: also write TensorBoard events to out_dir/tb.
        progress: show a tqdm progress bar (on a terminal; logs and pipes get the per-epoch lines only).
        plot: save curves.png at the end.
    """

    epochs: int = 30
    seed: int = 0
    label_smoothing: float = 0.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    out_dir: str = "outputs/run"
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int = 0
    eval_every_epochs: int = 1
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True


@dataclass
class Config:
    """A whole run: model, data, optim, schedule and train sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON safe, tuples as lists)."""
        return plain_data(dataclasses.asdict(self))


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


def _convert(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists to tuples, int to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(key, option, value)
            except (TypeError, ValueError) as error:
                errors.append(error)
        raise _mismatch(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
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
            raise ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_convert(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _mismatch(key, tp, value)
        return dict(value)
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
            return float(value)
        raise _mismatch(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(key, tp, value)
    if tp is Any:
        return value
    raise TypeError(f"config key {key!r}: unsupported annotation {tp!r}")  # a bug in this module


def _mismatch(key: str, tp: Any, value: Any) -> TypeError:
    return TypeError(f"config key {key!r}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass `cls` from plain data; unknown keys and wrong types raise naming `prefix.key`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"in {prefix!r}" if prefix else "at the top level"
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ValueError(f"unknown config key {dotted!r}; allowed keys {where}: {names}")
    values = {k: _convert(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    return cls(**values)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and check a `Config` from nested plain data (missing keys take their defaults)."""
    if not isinstance(data, dict):
        raise TypeError(f"a config must be a mapping of sections {[f.name for f in dataclasses.fields(Config)]}, "
                        f"got {type(data).__name__}")
    config = build_section(Config, data)
    validate(config)
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to nested plain data, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. optim.lr=0.05), got {item!r}")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"--set key must be section.key (e.g. train.epochs), got {dotted!r}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {dotted!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path` (ValueError if missing, TypeError if not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--set` overrides, check everything and return the `Config`."""
    return config_from_dict(apply_overrides(read_config_data(path), list(overrides or [])))


def validate(config: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    positive = {
        "model.num_classes": config.model.num_classes,
        "data.image_size": config.data.image_size,
        "data.batch_size": config.data.batch_size,
        "data.clip_len": config.data.clip_len,
        "data.frame_stride": config.data.frame_stride,
        "data.eval_clips": config.data.eval_clips,
        "train.epochs": config.train.epochs,
        "train.eval_every_epochs": config.train.eval_every_epochs,
    }
    optional_positive = {
        "data.eval_batch_size": config.data.eval_batch_size,
        "data.train_per_class": config.data.train_per_class,
        "data.eval_per_class": config.data.eval_per_class,
        "data.resize": config.data.resize,
        "train.threads": config.train.threads,
        "train.max_steps_per_epoch": config.train.max_steps_per_epoch,
    }
    for key, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
        if value < 1:
            raise ValueError(f"config key {key!r}: expected an integer >= 1, got {value}")
    if config.data.workers < 0 or config.train.checkpoint_every_steps < 0:
        raise ValueError("config keys 'data.workers' and 'train.checkpoint_every_steps' must be >= 0")
    if not 0.0 <= config.data.val_fraction < 1.0:
        raise ValueError(f"config key 'data.val_fraction': expected 0 <= value < 1, got {config.data.val_fraction}")
    if not 0.0 <= config.train.label_smoothing < 1.0:
        raise ValueError(
            f"config key 'train.label_smoothing': expected 0 <= value < 1, got {config.train.label_smoothing}"
        )
    if config.optim.lr <= 0:
        raise ValueError(f"config key 'optim.lr': expected a value > 0, got {config.optim.lr}")
    if config.optim.weight_decay < 0:
        raise ValueError(f"config key 'optim.weight_decay': expected >= 0, got {config.optim.weight_decay}")
    if config.optim.grad_clip_norm is not None and config.optim.grad_clip_norm <= 0:
        raise ValueError(f"config key 'optim.grad_clip_norm': expected > 0 or null, got {config.optim.grad_clip_norm}")
    if config.schedule.warmup_epochs < 0:
        raise ValueError(f"config key 'schedule.warmup_epochs': expected >= 0, got {config.schedule.warmup_epochs}")
    if list(config.schedule.milestones) != sorted(config.schedule.milestones):
        raise ValueError(f"config key 'schedule.milestones': expected increasing epochs, got "
                         f"{list(config.schedule.milestones)}")
    if not config.data.train:
        raise ValueError("config key 'data.train': expected a folder, got nothing")
