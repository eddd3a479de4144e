"""COCO-format detection data: json + image folder -> (image, target) pairs torchvision's detectors take.

    instances.json + images/ -> checked annotations (bad ones reported by image id, skipped)
        -> image (3, H, W) float in [0, 1], target {boxes (N, 4) xyxy, labels (N,), masks (N, H, W),
           image_id, area, iscrowd} -> flip (boxes and masks together) -> grouped batches

Crowd annotations are dropped from training targets and kept in the evaluation ground truth, where
COCOeval treats them as ignore regions (torchvision's references do the same). Resizing is the
detector's own (GeneralizedRCNNTransform resizes images, boxes and masks together and maps
predictions back), so targets here stay in original image coordinates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from gcnet.data.errors import CorruptFileError, OnCorrupt, check_on_corrupt
from gcnet.data.image import decode_image_file

logger = logging.getLogger("gcnet.detection")

CategoryMapping = Literal["contiguous", "coco_ids"]
# Problem kinds, in the order a report lists them.
PROBLEM_KINDS: tuple[str, ...] = (
    "missing_image",
    "unreadable_image",
    "unknown_image_id",
    "unknown_category",
    "bad_box",
    "zero_size_box",
    "bad_segmentation",
    "duplicate_id",
)


@dataclass(frozen=True)
class Problem:
    """One skipped annotation or image: the image id (None if the record has none), kind and details."""

    image_id: int | None
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"image {self.image_id}: {self.kind}: {self.detail}"


@dataclass
class DataReport:
    """What loading skipped and why, counted by kind; `log()` writes one summary line and each problem."""

    source: str
    problems: list[Problem] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    crowd: int = 0
    empty_images_dropped: int = 0

    def add(self, image_id: int | None, kind: str, detail: str) -> None:
        """Record a problem (kinds are those of PROBLEM_KINDS)."""
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; expected one of {list(PROBLEM_KINDS)}")
        self.problems.append(Problem(image_id, kind, detail))

    def counts(self) -> dict[str, int]:
        """Problems per kind (kinds with none left out)."""
        counted = Counter(p.kind for p in self.problems)
        return {k: counted[k] for k in PROBLEM_KINDS if counted[k]}

    def image_ids(self, kind: str | None = None) -> list[int]:
        """Sorted ids of images with a problem (of `kind`, if given)."""
        return sorted(
            {p.image_id for p in self.problems if p.image_id is not None and kind in (None, p.kind)}
        )

    def summary(self) -> str:
        """One line: what was kept and what was skipped, by kind."""
        skipped = ", ".join(f"{n} {k}" for k, n in self.counts().items()) or "nothing"
        return (
            f"{self.source}: {self.images} images, {self.annotations} annotations ({self.crowd} crowd) kept; "
            f"skipped {skipped}; {self.empty_images_dropped} training images without objects dropped"
        )

    def log(self, log: logging.Logger = logger) -> None:
        """The summary at INFO (WARNING if anything was skipped), then each problem at WARNING."""
        log.log(logging.WARNING if self.problems else logging.INFO, "%s", self.summary())
        for problem in self.problems:
            log.warning("skipped %s", problem)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for summary.json."""
        return {
            "source": self.source,
            "images": self.images,
            "annotations": self.annotations,
            "crowd": self.crowd,
            "empty_images_dropped": self.empty_images_dropped,
            "counts": self.counts(),
            "problems": [{"image_id": p.image_id, "kind": p.kind, "detail": p.detail} for p in self.problems],
        }


@dataclass(frozen=True)
class SkippedImage:
    """Placeholder for an image that failed to decode; `collate_detection` drops it and reports it."""

    image_id: int
    path: str
    reason: str


Sample = tuple[Tensor, dict[str, Tensor]]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_segmentation(segmentation: object, height: int, width: int) -> str | None:
    """None if pycocotools can rasterise `segmentation`, else why not."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty polygon list"
        for polygon in segmentation:
            if (
                not isinstance(polygon, list)
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(map(_is_number, polygon))
            ):
                return "a polygon is not a flat list of >= 3 (x, y) points"
            # Far outside the image pycocotools crashes (~1e9) or spends minutes (~-1e9) rasterising.
            xs, ys = polygon[0::2], polygon[1::2]
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                return (f"polygon points reach ({min(xs):g}..{max(xs):g}, {min(ys):g}..{max(ys):g}), far outside "
                        f"the {width}x{height} image")
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2) or counts is None:
            return "RLE without size [h, w] and counts"
        if list(size) != [height, width]:
            return f"RLE size {size} differs from the image's [{height}, {width}]"
        return None
    return f"segmentation is a {type(segmentation).__name__}, expected polygons (list) or RLE (dict)"


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE -> (H, W) uint8 mask (pycocotools, as COCO.annToMask)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools 2.0 vs numpy 2: a DeprecationWarning about __array__(copy=)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def _read_annotations(annotations: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(annotations, Mapping):
        data, source = dict(annotations), "annotations"
    else:
        path = Path(annotations)
        if not path.is_file():
            raise ValueError(f"no COCO annotation file at {str(path)!r}")
        try:
            with path.open() as handle:
                data, source = json.load(handle), str(path)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a COCO json file ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict):
        raise TypeError(f"{source}: expected a COCO json object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise TypeError(f"{source}: expected a list under {key!r} (COCO instances format)")
    return data, source


class CocoDetection(Dataset):
    """COCO instances (json + image folder) as torchvision detection samples, bad records reported and skipped.

    Args:
        images: folder holding each image's `file_name`.
        annotations: path of the instances json, or its parsed content.
        train: drop crowd objects from targets and images left without objects (torchvision's
            references); evaluation keeps every image and uses crowd regions as ignore areas.
        masks: build instance masks (Mask R-CNN); a bad segmentation then skips its annotation.
        transform: callable (image, target) -> (image, target) on tv_tensors; see `detection_transforms`.
        category_mapping: "contiguous" labels 1..K in sorted category-id order, or "coco_ids"
            (label = category id, torchvision's 91-class COCO models).
        image_ids: keep only these images (in this order); None keeps all, sorted by id.
        max_images: keep the first N images after the checks.
        on_corrupt: an undecodable image is "skip"ped (reported by the collate function) or an "error".

    Shape:
        image (3, H, W) float32 in [0, 1]; target boxes (N, 4) xyxy float32, labels (N,) int64,
        masks (N, H, W) uint8, area (N,), iscrowd (N,), image_id () int64.
    """

    def __init__(
        self,
        images: str | os.PathLike[str],
        annotations: str | os.PathLike[str] | Mapping[str, Any],
        *,
        train: bool,
        masks: bool = True,
        transform: v2.Transform | None = None,
        category_mapping: CategoryMapping = "contiguous",
        image_ids: Sequence[int] | None = None,
        max_images: int | None = None,
        on_corrupt: OnCorrupt = "skip",
    ) -> None:
        if category_mapping not in ("contiguous", "coco_ids"):
            raise ValueError(
                f"unknown category_mapping {category_mapping!r}; expected one of ['contiguous', 'coco_ids']"
            )
        if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
            raise ValueError(f"max_images must be a positive int or None, got {max_images!r}")
        self.root = Path(images)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist")
        self.train, self.masks, self.transform = train, masks, transform
        self.on_corrupt = check_on_corrupt(on_corrupt)
        data, source = _read_annotations(annotations)
        self.report = DataReport(source)
        self.categories = sorted(
            (c for c in data["categories"] if isinstance(c, dict) and isinstance(c.get("id"), int)),
            key=lambda c: c["id"],
        )
        ids = [c["id"] for c in self.categories]
        if len(set(ids)) != len(ids) or not ids:
            raise ValueError(f"{source}: categories need unique integer ids, got {ids}")
        if category_mapping == "contiguous":
            self.category_to_label = {cid: i + 1 for i, cid in enumerate(ids)}
        else:
            if min(ids) < 1:
                raise ValueError(
                    f"{source}: category_mapping 'coco_ids' needs ids >= 1 (0 is background), got {min(ids)}"
                )
            self.category_to_label = {cid: cid for cid in ids}
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        self.category_names = {c["id"]: str(c.get("name", c["id"])) for c in self.categories}
        self.num_classes = max(self.category_to_label.values()) + 1
        self.records, self.annotations_by_image = self._check(data, image_ids, max_images)
        self._gt: COCO | None = None
        self.report.log()

    def _check(
        self, data: dict[str, Any], image_ids: Sequence[int] | None, max_images: int | None
    ) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
        report = self.report
        images: dict[int, dict[str, Any]] = {}
        for record in data["images"]:
            if not (
                isinstance(record, dict)
                and isinstance(record.get("id"), int)
                and isinstance(record.get("file_name"), str)
                and all(isinstance(record.get(k), int) and record[k] > 0 for k in ("height", "width"))
            ):
                report.add(
                    record.get("id") if isinstance(record, dict) else None,
                    "missing_image",
                    f"image record lacks id / file_name / positive height and width: {record!r}"[:200],
                )
                continue
            if record["id"] in images:
                report.add(record["id"], "duplicate_id", f"image id {record['id']} is listed again "
                           f"({record['file_name']}); the first record is kept")
                continue
            images[record["id"]] = record
        if image_ids is not None:
            unknown = [i for i in image_ids if i not in images]
            if unknown:
                raise ValueError(f"image_ids {unknown} are not in {report.source}")
            wanted = list(dict.fromkeys(image_ids))
        else:
            wanted = sorted(images)
        kept: list[dict[str, Any]] = []
        for image_id in wanted:
            path = self.root / images[image_id]["file_name"]
            if not path.is_file():
                report.add(image_id, "missing_image", f"no file {path}")
            else:
                kept.append(images[image_id])
        by_image: dict[int, list[dict[str, Any]]] = {r["id"]: [] for r in kept}
        seen: set[object] = set()
        for index, ann in enumerate(data["annotations"]):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if isinstance(ann, dict) and ann.get("id") is not None:
                if ann["id"] in seen:
                    report.add(image_id if isinstance(image_id, int) else None, "duplicate_id",
                               f"annotation id {ann['id']} is used again; this one is skipped")
                    continue
                seen.add(ann["id"])
            if image_id not in images:
                report.add(
                    image_id if isinstance(image_id, int) else None,
                    "unknown_image_id",
                    f"annotation {ann.get('id', index) if isinstance(ann, dict) else index} names no listed image",
                )
                continue
            if image_id not in by_image:  # the image was filtered out or is missing (reported above)
                continue
            problem = self._check_annotation(ann, images[image_id])
            if problem is not None:
                report.add(image_id, *problem)
                continue
            by_image[image_id].append(ann)
        if self.train:  # as torchvision's references: train only on images with at least one object
            with_objects = [r for r in kept if any(not a.get("iscrowd", 0) for a in by_image[r["id"]])]
            report.empty_images_dropped = len(kept) - len(with_objects)
            kept = with_objects
        if max_images is not None:
            kept = kept[:max_images]
        by_image = {r["id"]: by_image[r["id"]] for r in kept}
        report.images = len(kept)
        report.annotations = sum(len(v) for v in by_image.values())
        report.crowd = sum(bool(a.get("iscrowd", 0)) for v in by_image.values() for a in v)
        return kept, by_image

    def _check_annotation(self, ann: dict[str, Any], image: dict[str, Any]) -> tuple[str, str] | None:
        """None if the annotation is usable, else (kind, detail)."""
        name = f"annotation {ann.get('id')}"
        if ann.get("category_id") not in self.category_to_label:
            return (
                "unknown_category",
                f"{name} has category_id {ann.get('category_id')!r}, not in the categories",
            )
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
            return "bad_box", f"{name} has bbox {box!r}, expected [x, y, w, h] numbers"
        x, y, w, h = box
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, image["width"]), min(y + h, image["height"])
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            return (
                "zero_size_box",
                f"{name} has bbox {box} (no area inside the {image['width']}x{image['height']} image)",
            )
        if self.masks:
            why = _check_segmentation(ann.get("segmentation"), image["height"], image["width"])
            if why is not None:
                return "bad_segmentation", f"{name}: {why}"
        return None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        """Ids of the kept images, in dataset order."""
        return [r["id"] for r in self.records]

    def aspect_ratios(self) -> list[float]:
        """width / height of every kept image, from the json (no decoding)."""
        return [r["width"] / r["height"] for r in self.records]

    def coco_ground_truth(self) -> COCO:
        """A pycocotools COCO of the kept images and annotations (crowd included), for COCOeval."""
        if self._gt is None:
            gt = COCO()
            anns = [a for v in self.annotations_by_image.values() for a in v]
            gt.dataset = {
                "images": [dict(r) for r in self.records],
                "categories": self.categories,
                "annotations": [
                    {
                        **a,
                        "area": float(a.get("area", a["bbox"][2] * a["bbox"][3])),
                        "iscrowd": int(a.get("iscrowd", 0)),
                    }
                    for a in anns
                ],
            }
            for i, ann in enumerate(gt.dataset["annotations"]):
                ann.setdefault("id", i + 1)
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                gt.createIndex()
            self._gt = gt
        return self._gt

    def _target(self, record: dict[str, Any]) -> dict[str, Any]:
        height, width = record["height"], record["width"]
        anns = [
            a for a in self.annotations_by_image[record["id"]] if not (self.train and a.get("iscrowd", 0))
        ]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # (N, 4) xywh
        boxes[:, 2:] += boxes[:, :2]  # xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(
                [self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "image_id": torch.tensor(record["id"], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns]),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }
        if self.masks:
            masks = [segmentation_to_mask(a["segmentation"], height, width) for a in anns]
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))  # (N, H, W) uint8
        return target

    def __getitem__(self, index: int) -> Sample | SkippedImage:
        record = self.records[index]
        path = self.root / record["file_name"]
        try:
            image = decode_image_file(str(path))  # (3, H, W) uint8 RGB
        except CorruptFileError as error:
            return self._corrupt(record, path, error.reason)
        if tuple(image.shape[1:]) != (record["height"], record["width"]):
            return self._corrupt(
                record,
                path,
                f"decoded size {tuple(image.shape[1:])} differs from the json's "
                f"({record['height']}, {record['width']})",
            )
        sample = (tv_tensors.Image(image), self._target(record))
        if self.transform is not None:
            sample = self.transform(*sample)
        image, target = sample
        plain = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}
        return image.as_subclass(Tensor), plain

    def _corrupt(self, record: dict[str, Any], path: Path, reason: str) -> SkippedImage:
        if self.on_corrupt == "error":
            raise ValueError(f"image {record['id']} ({path}): {reason}")
        logger.warning("skipping image %d (%s): %s", record["id"], path, reason)
        return SkippedImage(record["id"], str(path), reason)


def detection_transforms(train: bool, flip_prob: float = 0.5) -> v2.Compose:
    """uint8 image -> float in [0, 1]; in training a horizontal flip moving boxes and masks with the image."""
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(flip_prob)] if train and flip_prob > 0 else []
    steps.append(v2.ToDtype(torch.float32, scale=True))  # images only; boxes and masks keep their dtypes
    return v2.Compose(steps)


@dataclass
class DetectionBatch:
    """A collated batch: lists of images and targets (sizes differ), and the images that failed to decode."""

    images: list[Tensor]
    targets: list[dict[str, Tensor]]
    skipped: list[SkippedImage]


def collate_detection(batch: Sequence[Sample | SkippedImage]) -> DetectionBatch:
    """Keep images as a list (the detector batches them itself); set aside skipped ones for the report."""
    skipped = [item for item in batch if isinstance(item, SkippedImage)]
    samples = [item for item in batch if not isinstance(item, SkippedImage)]
    return DetectionBatch([s[0] for s in samples], [s[1] for s in samples], skipped)


def aspect_ratio_groups(ratios: Sequence[float], factor: int = 3) -> list[int]:
    """Bin width/height ratios at 2 ** linspace(-1, 1, 2 * factor + 1) (torchvision's references).

    factor=0 puts every image in one group.
    """
    if not isinstance(factor, int) or factor < 0:
        raise ValueError(f"aspect-ratio group factor must be an int >= 0, got {factor!r}")
    if factor == 0:
        return [0] * len(ratios)
    bins = 2 ** np.linspace(-1, 1, 2 * factor + 1)
    return [int(g) for g in np.digitize(np.asarray(ratios, dtype=np.float64), bins)]
