import logging
from pathlib import Path

import pytest
import torch

from gcnet.data import CorruptFileError, ImageFolderDataset, Skipped, image_transform, scan_folder
from gcnet.data.image import IMAGE_EXTENSIONS
from gcnet.data.sampling import SeededDataset, collate_skipping
from tests.engine.tiny import make_image_folder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", classes=3, per_class=4, size=12)


def test_scan_folder_sorted_classes_and_subset(folder: Path) -> None:
    classes, samples = scan_folder(folder, IMAGE_EXTENSIONS, per_class=2)
    assert classes == ["class_0", "class_1", "class_2"]
    assert [label for _, label in samples] == [0, 0, 1, 1, 2, 2]


def test_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        scan_folder(tmp_path / "nowhere", IMAGE_EXTENSIONS)


@pytest.mark.parametrize("augment", ["cifar", "imagenet", "none"])
def test_transforms_give_normalised_crops(folder: Path, augment: str) -> None:
    classes, samples = scan_folder(folder, IMAGE_EXTENSIONS)
    for train in (True, False):
        dataset = ImageFolderDataset(samples, classes, image_transform(train, augment, 8, (0.5,) * 3, (0.25,) * 3))
        image, label = dataset[0]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 0


def test_unknown_augment_lists_valid() -> None:
    with pytest.raises(ValueError, match=r"\['cifar', 'imagenet', 'none'\]"):
        image_transform(True, "autoaugment", 8, (0.5,) * 3, (0.25,) * 3)


def test_corrupt_jpeg_is_reported_by_path(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = folder / "class_1" / "zz_corrupt.jpg"
    good = (folder / "class_1" / "000.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated JPEG
    classes, samples = scan_folder(folder, IMAGE_EXTENSIONS)
    index = [p for p, _ in samples].index(str(bad))
    transform = image_transform(False, "none", 8, (0.5,) * 3, (0.25,) * 3)

    with caplog.at_level(logging.WARNING, logger="gcnet.data"):
        item = ImageFolderDataset(samples, classes, transform, on_corrupt="skip")[index]
    assert isinstance(item, Skipped) and item.path == str(bad)
    assert str(bad) in caplog.text

    batch = collate_skipping([ImageFolderDataset(samples, classes, transform)[i] for i in (0, index)])
    assert batch["skipped"] == [str(bad)] and batch["input"].shape[0] == 1

    with pytest.raises(CorruptFileError, match="zz_corrupt.jpg"):
        ImageFolderDataset(samples, classes, transform, on_corrupt="error")[index]
    with pytest.raises(ValueError, match="skip"):
        ImageFolderDataset(samples, classes, transform, on_corrupt="ignore")


def test_seeded_augmentation_depends_on_seed_epoch_index_only(folder: Path) -> None:
    classes, samples = scan_folder(folder, IMAGE_EXTENSIONS)
    dataset = SeededDataset(ImageFolderDataset(samples, classes, image_transform(True, "cifar", 12, (0,) * 3,
                                                                                 (1,) * 3)), seed=3)
    state = torch.get_rng_state()
    first = dataset[5][0]
    assert torch.equal(torch.get_rng_state(), state), "loading data must not move the global RNG"
    torch.manual_seed(123)
    assert torch.equal(dataset[5][0], first)
    views = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        views.add(dataset[5][0].sum().item())
    assert len(views) > 1


def test_sixteen_bit_png_keeps_its_grey_levels(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from gcnet.data.image import decode_image_file

    levels = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    image = decode_image_file(str(tmp_path / "deep.png"))
    assert image.shape == (3, 2, 2) and image[0].tolist() == [[0, 64], [128, 255]]


def test_images_smaller_than_the_crop_follow_on_corrupt(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 16)).save(tmp_path / "h_tall.jpg")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    samples = [(str(tmp_path / "h_tall.jpg"), 0), (str(tmp_path / "dot.png"), 0)]
    transform = image_transform(True, "cifar", 32, (0.5,) * 3, (0.5,) * 3)
    skipping = ImageFolderDataset(samples, ["a"], transform, "skip")
    assert [isinstance(skipping[i], Skipped) for i in range(2)] == [True, True]
    assert "h_tall.jpg" in skipping[0].path and "(16, 64)" in skipping[0].reason
    with pytest.raises(CorruptFileError, match="dot.png"):
        ImageFolderDataset(samples, ["a"], transform, "error")[1]


def test_an_empty_class_folder_is_refused_by_name(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=2, per_class=1, size=8)
    (root / "class_9").mkdir()
    with pytest.raises(ValueError, match=r"class folders \['class_9'\] hold no files"):
        scan_folder(root, (".jpg", ".png"))
