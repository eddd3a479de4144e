"""ImageFolder data (`<root>/<class>/<image>`, e.g. ImageNet or the CIFAR-10 JPEGs) with transforms v2."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from gcnet.data.errors import CorruptFileError, OnCorrupt, Skipped, check_on_corrupt, handle_corrupt

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
AUGMENTS = ("cifar", "imagenet", "none")


def find_classes(root: Path) -> list[str]:
    """Sorted class folder names under `root` (sorted names give CIFAR-10's official label order)."""
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"data folder {str(root)!r} has no class folders; expected <root>/<class>/<file>")
    return classes


def scan_folder(
    root: str | Path, extensions: Sequence[str], per_class: int | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) of a `<root>/<class>/<file>` tree, files sorted, first `per_class` kept."""
    root = Path(root)
    classes = find_classes(root)
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        samples.extend((str(p), label) for p in files[:per_class])
        if not files:
            empty.append(name)
    if empty and len(empty) < len(classes):
        raise ValueError(f"data folder {str(root)!r}: class folders {empty} hold no files ending in "
                         f"{list(extensions)}; add files or remove them (an empty folder would still count as a class)")
    if not samples:
        raise ValueError(f"data folder {str(root)!r} has no files ending in {list(extensions)}")
    return classes, samples


def image_transform(
    train: bool, augment: str, size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Tensor], Tensor]:
    """uint8 (C, H, W) -> normalised float (C, size, size); random only when `train`."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; expected one of {list(AUGMENTS)}")
    steps: list[Callable[..., Tensor]]
    if augment == "cifar":
        steps = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(size)]
    elif augment == "imagenet":
        steps = (
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
            if train
            else [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
        )
    else:
        steps = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def decode_image_file(path: str) -> Tensor:
    """uint8 RGB (3, H, W) of an image file; unreadable files raise `CorruptFileError` naming the path."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16-bit (or 32-bit integer) greyscale: scale to 8 bits, not clip
                wide = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") or wide.max() <= 65535 else float(2**31 - 1)
                grey = np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8)
                array = np.repeat(grey[..., None], 3, axis=2)
            else:
                array = np.asarray(image.convert("RGB"))  # (H, W, 3); convert() forces a full decode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptFileError(path, f"{type(error).__name__}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageFolderDataset(Dataset):
    """Images of a `<root>/<class>/<file>` tree as (image, label) pairs.

    Args:
        samples: (path, label) pairs, e.g. from `scan_folder`.
        classes: class names in label order.
        transform: uint8 (3, H, W) -> tensor.
        on_corrupt: "skip" returns a `Skipped` marker for the collate function to drop and count;
            "error" raises `CorruptFileError` with the path.
        cache: keep decoded images in memory after the first read (small data sets).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable[[Tensor], Tensor],
        on_corrupt: OnCorrupt = "skip",
        cache: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self._cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tensor:
        """Decoded uint8 image `index` (from the cache when enabled)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = decode_image_file(self.samples[index][0])
        if self._cache is not None:
            self._cache[index] = image
        return image

    def preload(self) -> int:
        """Decode every image into the cache now (before workers fork); returns how many were skipped."""
        skipped = 0
        for index in range(len(self)):
            try:
                self.load(index)
            except CorruptFileError as error:
                handle_corrupt(error, self.on_corrupt)
                skipped += 1
        return skipped

    def __getitem__(self, index: int) -> tuple[Tensor, int] | Skipped:
        path, label = self.samples[index]
        try:
            image = self.load(index)
            try:
                return self.transform(image), label
            except (ValueError, RuntimeError) as error:  # e.g. an image smaller than the crop
                raise CorruptFileError(path, f"cannot transform its {tuple(image.shape[1:])} pixels: {error}") from error
        except CorruptFileError as error:
            return handle_corrupt(error, self.on_corrupt)
