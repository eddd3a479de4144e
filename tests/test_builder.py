"""Fine-tuning from a saved torchvision checkpoint for every task: new blocks start as the identity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from gcnet.builder import build_model, model_options, train
from gcnet.config import ConfigError, config_from_dict
from gcnet.engine.metrics import read_csv
from tests.engine.tiny import make_image_folder


@pytest.fixture(scope="module")
def torchvision_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ImageNet-layout state dicts (random weights, 1000 classes), saved as torchvision's files are."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    files = {}
    for name in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, name)()
        for module in model.modules():  # non-trivial BN statistics, as in trained weights
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        files[name] = root / f"{name}.pth"
        torch.save(model.state_dict(), files[name])
    return files


def _first_loss(config: dict[str, Any]) -> float:
    train(config_from_dict(config))
    return float(read_csv(Path(config["train"]["out_dir"]) / "steps.csv")[0]["loss"])


def _runs(config: dict[str, Any], tmp_path: Path, block: dict[str, Any]) -> tuple[float, float]:
    """Step-0 loss with the block and without it (same data, seed and weights)."""
    with_block = {**config, "model": {**config["model"], "context": block},
                  "train": {**config["train"], "out_dir": str(tmp_path / "block")}}
    plain = {**config, "train": {**config["train"], "out_dir": str(tmp_path / "plain")}}
    return _first_loss(with_block), _first_loss(plain)


def test_image_classifier_fine_tunes_with_a_new_head_and_new_blocks(
    torchvision_checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = make_image_folder(tmp_path / "images", classes=3, per_class=4, size=32)
    config = {
        "task": "image",
        "model": {"name": "resnet18", "weights": str(torchvision_checkpoints["resnet18"])},  # 1000 -> 3 classes
        "data": {"train": str(images), "image_size": 32, "batch_size": 4, "augment": "none"},
        "optim": {"lr": 0.01},
        "train": {"epochs": 1, "max_steps_per_epoch": 1, "progress": False, "plot": False},
    }
    with caplog.at_level(logging.INFO, logger="gcnet.build"):
        with_gc, plain = _runs(config, tmp_path, {"block": "gc", "reduction": 4, "stages": [False, True, True, True]})
    assert with_gc == pytest.approx(plain, rel=1e-6, abs=1e-7)
    assert "a new classifier ['fc.weight', 'fc.bias']" in caplog.text and "of 6 new blocks" in caplog.text

    loaded = build_model(config_from_dict({**config, "model": {**config["model"], "context": "gc"}}), 3)
    reference = torch.load(torchvision_checkpoints["resnet18"], weights_only=True)
    assert torch.equal(loaded.state_dict()["layer3.1.conv2.weight"], reference["layer3.1.conv2.weight"])
    assert loaded.fc.out_features == 3


def test_a_checkpoint_that_does_not_fit_is_refused_by_key(torchvision_checkpoints: dict[str, Path],
                                                          tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=16)
    config = config_from_dict({"model": {"name": "resnet34", "weights": str(torchvision_checkpoints["resnet18"])},
                               "data": {"train": str(images)}})
    with pytest.raises(ValueError, match=r"does not fit ResNet: \d+ missing: layer1.2.conv1.weight"):
        build_model(config, 2)
    with pytest.raises(ConfigError, match="config key 'model.weights': no file at"):
        build_model(config_from_dict({"model": {"name": "resnet18", "weights": str(tmp_path / "none.pth")},
                                      "data": {"train": "x"}}), 2)


def test_video_classifier_inflates_2d_weights_and_new_blocks_start_as_identity(
    torchvision_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("av")
    from tests.data.clips import make_clip_folder

    clips = make_clip_folder(tmp_path / "clips", classes=2, per_class=2)
    config = {
        "task": "video",
        "model": {"name": "i3d_resnet50", "num_classes": 2, "weights": str(torchvision_checkpoints["resnet50"])},
        "data": {"train": str(clips), "clip_len": 4, "frame_stride": 1, "image_size": 32, "batch_size": 2},
        "optim": {"lr": 0.01},
        "train": {"epochs": 1, "max_steps_per_epoch": 1, "progress": False, "plot": False},
    }
    with_gc, plain = _runs(config, tmp_path, {"block": "gc", "stages": [False, True, True, True]})
    assert with_gc == pytest.approx(plain, rel=1e-6, abs=1e-7)
    model = build_model(config_from_dict(config))
    weight = torch.load(torchvision_checkpoints["resnet50"], weights_only=True)["layer1.0.conv1.weight"]
    inflated = model.state_dict()["layer1.0.conv1.weight"]  # (O, I, 3, 1, 1): repeated over time, / 3
    assert inflated.shape[2] == 3 and torch.allclose(inflated.sum(dim=2), weight, atol=1e-6)


def test_video_training_in_channels_last_3d(tmp_path: Path) -> None:
    pytest.importorskip("av")
    from gcnet.engine.evaluate import to_channels_last
    from tests.data.clips import make_clip_folder

    clips = make_clip_folder(tmp_path / "clips", classes=2, per_class=2)
    config = {
        "task": "video", "model": {"name": "c2d_resnet50", "num_classes": 2, "channels_last": True},
        "data": {"train": str(clips), "clip_len": 4, "frame_stride": 1, "image_size": 32, "batch_size": 2},
        "optim": {"lr": 0.01},
        "train": {"epochs": 1, "max_steps_per_epoch": 1, "progress": False, "plot": False,
                  "out_dir": str(tmp_path / "run")},
    }
    assert torch.isfinite(torch.tensor(_first_loss(config)))  # Module.to(memory_format=channels_last) raised
    mixed = to_channels_last(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv3d(4, 4, 3),
                                                 torch.nn.Linear(4, 2)))
    assert mixed[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert mixed[1].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert isinstance(mixed[1].weight, torch.nn.Parameter) and mixed[2].weight.is_contiguous()


def test_detector_fine_tunes_its_backbone_and_new_blocks_start_as_identity(
    torchvision_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from tests.detection.test_train import tiny_config

    config = tiny_config(tmp_path / "data", tmp_path / "unused", max_steps_per_epoch=1, picture_images=0)
    config["model"] = {"name": "resnet18", "weights": str(torchvision_checkpoints["resnet18"]),
                       "detector": {**config["model"]["detector"], "trainable_layers": 3, "frozen_bn": True}}
    with_gc, plain = _runs(config, tmp_path, {"block": "gc", "reduction": 4})
    assert with_gc == pytest.approx(plain, rel=1e-6, abs=1e-7)


def test_a_reduction_takes_the_short_route_to_the_block() -> None:
    config = config_from_dict({"model": {"name": "resnet50", "context": {"block": "gc", "reduction": 4,
                                                                        "fusion": "scale"}},
                               "data": {"train": "x"}})
    assert model_options(config.model) == {"context": "gc", "reduction": 4, "context_options": {"fusion": "scale"}}
    model = build_model(config, 10)
    assert model.layer3[0].context.reduction == 4 and model.layer3[0].context.fusion == "scale"


def test_evaluation_labels_follow_the_training_classes_by_name(tmp_path: Path) -> None:
    import shutil

    from gcnet.builder import build_eval_dataset, build_task
    from gcnet.engine.distributed import setup

    images = make_image_folder(tmp_path / "train", classes=3, per_class=2, size=16)
    subset = tmp_path / "subset"
    for name in ("class_1", "class_2"):  # class_0 missing: without names, class_1 would become label 0
        shutil.copytree(images / name, subset / name)
    config = config_from_dict({"model": {"name": "cifar_resnet20"}, "data": {"train": str(images)}})
    classes = ["class_0", "class_1", "class_2"]
    dataset = build_eval_dataset(config, str(subset), classes=classes)
    assert sorted({label for _, label in dataset.samples}) == [1, 2]
    shutil.copytree(images / "class_0", subset / "class_9")
    with pytest.raises(ValueError, match=r"classes \['class_9'\] are not among the 3 the model was trained on"):
        build_eval_dataset(config, str(subset), classes=classes)
    too_few = config_from_dict({"model": {"name": "cifar_resnet20", "num_classes": 2}, "data": {"train": str(images)}})
    with pytest.raises(ConfigError, match=r"'model.num_classes': 2 is below the 3 classes of .*train"):
        build_task(too_few, setup("cpu"))

    clips = tmp_path / "list.txt"
    clips.write_text("a.mp4 0\nb.mp4 5\n")
    video = config_from_dict({"task": "video", "model": {"name": "c2d_resnet50"}, "data": {"train": str(clips)}})
    with pytest.raises(ValueError, match=r"list.txt: classes \['5'\] are not among the 2"):
        build_eval_dataset(video, str(clips), classes=["0", "1"])
