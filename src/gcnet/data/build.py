"""Turn the `data` section of a config into train/val/test datasets (the one place that reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from gcnet.data.image import IMAGE_EXTENSIONS, ImageFolderDataset, image_transform, scan_folder
from gcnet.data.video import VideoClipDataset, video_samples

if TYPE_CHECKING:
    from gcnet.engine.config import DataConfig


@dataclass
class DataSplits:
    """Datasets of a run; val and test are None when not configured."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]


def _split(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of `samples` (seeded, so every rank and every resume agrees)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(fraction * len(samples)))
    val = sorted(order[:held])
    train = sorted(order[held:])
    return [samples[i] for i in train], [samples[i] for i in val]


def _make(config: DataConfig, samples: list[tuple[str, int]], classes: list[str], train: bool) -> Dataset:
    if config.kind == "image":
        transform = image_transform(train, config.augment, config.image_size, config.mean, config.std)
        dataset = ImageFolderDataset(samples, classes, transform, config.on_corrupt, cache=config.cache)
        if config.cache:
            dataset.preload()
        return dataset
    return VideoClipDataset(
        samples,
        classes,
        clip_len=config.clip_len,
        stride=config.frame_stride,
        train=train,
        num_clips=1 if train else config.eval_clips,
        crop=config.image_size,
        resize=config.resize,
        mean=config.mean,
        std=config.std,
        on_corrupt=config.on_corrupt,
    )


def _scan(config: DataConfig, source: str, per_class: int | None) -> tuple[list[str], list[tuple[str, int]]]:
    if config.kind == "image":
        return scan_folder(source, IMAGE_EXTENSIONS, per_class)
    return video_samples(source, per_class)


def build_eval_dataset(config: DataConfig, source: str) -> Dataset:
    """An evaluation dataset (deterministic transforms) of `source` with the run's data settings."""
    classes, samples = _scan(config, source, config.eval_per_class)
    return _make(config, samples, classes, train=False)


def build_datasets(config: DataConfig, seed: int) -> DataSplits:
    """Train, validation (given or held out of train with `val_fraction`) and test datasets."""
    classes, samples = _scan(config, config.train, config.train_per_class)
    val_samples = None
    if config.val is None and config.val_fraction > 0:
        samples, val_samples = _split(samples, config.val_fraction, seed)
    train = _make(config, samples, classes, train=True)
    val = None
    if config.val is not None:
        val = build_eval_dataset(config, config.val)
    elif val_samples is not None:
        val = _make(config, val_samples, classes, train=False)
    test = build_eval_dataset(config, config.test) if config.test is not None else None
    return DataSplits(train, val, test, classes)
