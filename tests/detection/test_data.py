"""COCO data: masks from polygons and RLE, crowd handling, bad records reported by image id, flips, batching."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from gcnet.detection import (
    CocoDetection,
    SkippedImage,
    collate_detection,
    detection_transforms,
)
from tests.detection.synthetic import load, make_coco


def mask_box(mask: torch.Tensor) -> list[float]:
    """xyxy box around a (H, W) mask's pixels (pixel edges)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_samples_have_aligned_boxes_and_masks_from_polygons_and_rle(tmp_path: Path) -> None:
    images, annotations = make_coco(tmp_path, images=3)
    dataset = CocoDetection(images, annotations, train=True, transform=detection_transforms(False))
    assert len(dataset) == 3 and dataset.report.counts() == {}
    assert dataset.label_to_category == {1: 3, 2: 7} and dataset.num_classes == 3
    image, target = dataset[0]  # image 1: a polygon and an RLE mask
    assert (
        image.dtype == torch.float32 and image.shape == (3, 64, 80) and 0 <= image.min() <= image.max() <= 1
    )
    assert target["masks"].shape == (2, 64, 80) and target["masks"].dtype == torch.uint8
    assert target["labels"].tolist() == [1, 2] and int(target["image_id"]) == 1
    for box, mask in zip(target["boxes"], target["masks"]):
        assert mask_box(mask) == pytest.approx(box.tolist(), abs=1.0)
    assert type(target["boxes"]) is torch.Tensor  # plain tensors for the detector


def test_flip_moves_boxes_and_masks_with_the_image(tmp_path: Path) -> None:
    images, annotations = make_coco(tmp_path, images=1)
    plain = CocoDetection(images, annotations, train=True, transform=detection_transforms(False))
    flipped = CocoDetection(
        images, annotations, train=True, transform=detection_transforms(True, flip_prob=1.0)
    )
    (image, target), (image_f, target_f) = plain[0], flipped[0]
    width = image.shape[-1]
    torch.testing.assert_close(image_f, image.flip(-1))
    torch.testing.assert_close(target_f["masks"], target["masks"].flip(-1))
    expected = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [width, 0, width, 0]
    )
    torch.testing.assert_close(target_f["boxes"], expected)
    for box, mask in zip(target_f["boxes"], target_f["masks"]):
        assert mask_box(mask) == pytest.approx(box.tolist(), abs=1.0)


def test_bad_annotations_are_reported_by_image_id_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, annotations = make_coco(tmp_path, images=4)
    data = load(annotations)
    anns = data["annotations"]
    anns[0]["bbox"] = [10, 10, 0, 5]  # image 1: zero width
    anns[2]["category_id"] = 99  # image 2: unknown category
    anns[4]["segmentation"] = [[1, 2, 3]]  # image 3: a polygon of 1.5 points
    anns.append({**anns[5], "id": 100, "image_id": 42})  # no image 42
    data["images"].append({"id": 5, "file_name": "absent.jpg", "height": 64, "width": 80})  # missing file
    with caplog.at_level(logging.WARNING, logger="gcnet.detection"):
        dataset = CocoDetection(images, data, train=False)
    report = dataset.report
    assert report.counts() == {
        "missing_image": 1,
        "unknown_image_id": 1,
        "unknown_category": 1,
        "zero_size_box": 1,
        "bad_segmentation": 1,
    }
    assert report.image_ids("zero_size_box") == [1] and report.image_ids("unknown_category") == [2]
    assert report.image_ids("bad_segmentation") == [3] and report.image_ids("missing_image") == [5]
    assert len(dataset) == 4 and report.annotations == 8 - 3
    assert "skipped 1 missing_image, 1 unknown_image_id" in caplog.text
    assert "image 1: zero_size_box" in caplog.text and "image 42: unknown_image_id" in caplog.text
    assert "zero_size_box" in json.dumps(report.to_dict())


def test_unreadable_image_is_reported_by_id_or_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, annotations = make_coco(tmp_path, images=2)
    (images / "000002.jpg").write_bytes(b"not a jpeg")
    dataset = CocoDetection(images, annotations, train=True)
    with caplog.at_level(logging.WARNING, logger="gcnet.detection"):
        batch = collate_detection([dataset[0], dataset[1]])
    assert len(batch.images) == 1 and [s.image_id for s in batch.skipped] == [2]
    assert isinstance(batch.skipped[0], SkippedImage) and "skipping image 2" in caplog.text
    strict = CocoDetection(images, annotations, train=True, on_corrupt="error")
    with pytest.raises(ValueError, match="image 2"):
        strict[1]


def test_crowd_is_ignored_in_training_and_kept_for_evaluation(tmp_path: Path) -> None:
    images, annotations = make_coco(tmp_path, images=2)
    data = load(annotations)
    for ann in data["annotations"]:
        if ann["image_id"] == 2:
            ann["iscrowd"] = 1
    train = CocoDetection(images, data, train=True)
    evaluation = CocoDetection(images, data, train=False)
    assert train.image_ids == [1] and train.report.empty_images_dropped == 1  # no non-crowd object left
    assert evaluation.image_ids == [1, 2] and evaluation.report.crowd == 2
    assert len(evaluation.coco_ground_truth().getAnnIds(imgIds=[2], iscrowd=True)) == 2


def test_bad_arguments_name_what_is_expected(tmp_path: Path) -> None:
    images, annotations = make_coco(tmp_path, images=1)
    with pytest.raises(ValueError, match="category_mapping"):
        CocoDetection(images, annotations, train=True, category_mapping="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no COCO annotation file"):
        CocoDetection(images, tmp_path / "nope.json", train=True)
    with pytest.raises(TypeError, match="'annotations'"):
        CocoDetection(images, {"images": [], "categories": []}, train=True)
    with pytest.raises(ValueError, match=r"image_ids \[9\]"):
        CocoDetection(images, annotations, train=True, image_ids=[9])


def test_far_out_polygons_duplicate_ids_and_non_json_files_are_reported(tmp_path: Path) -> None:
    images, annotations = make_coco(tmp_path, images=3)
    data = load(annotations)
    anns = data["annotations"]
    anns[0]["segmentation"] = [[1e9, 1e9, 1e9 + 5, 1e9, 1e9, 1e9 + 5]]  # pycocotools would crash on it
    anns[2]["segmentation"] = [[-1e9, 0, 10, 0, 10, 10]]  # and spend minutes on this one
    anns.append({**anns[3]})  # the same annotation id again
    data["images"].append({**data["images"][1], "file_name": "other.jpg"})  # the same image id again
    started = time.monotonic()
    dataset = CocoDetection(images, data, train=False)
    assert time.monotonic() - started < 5
    counts = dataset.report.counts()
    assert counts["bad_segmentation"] == 2 and counts["duplicate_id"] == 2
    assert "far outside the 80x64 image" in json.dumps(dataset.report.to_dict())
    assert all(dataset[i] is not None for i in range(len(dataset)))
    (tmp_path / "broken.json").write_text("{'not': json")
    with pytest.raises(ValueError, match=r"broken.json: not a COCO json file"):
        CocoDetection(images, tmp_path / "broken.json", train=False)
