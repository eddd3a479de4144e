"""The registry: named configurations, duplicate names, unknown names and options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gcnet
from gcnet.models import create_model, get_model_entry, list_models, register_model
from gcnet.models.resnet import resnet18

ISSUE_NAMES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnet50_gc_r16",
    "resnet50_gc_r4",
    "resnet50_se",
    "resnet50_snl",
    "resnet50_nl1",
    "c2d_resnet50",
    "i3d_resnet50",
    "c2d_resnet50_nl5",
    "i3d_resnet50_nl5",
    "i3d_resnet50_nl10",
    "i3d_resnet50_gc",
    "cifar_resnet20",
]


def test_named_configurations_are_registered() -> None:
    assert set(ISSUE_NAMES) <= set(list_models())
    assert gcnet.list_models() == list_models() and gcnet.create_model is create_model
    assert list_models("i3d_*") == sorted(n for n in list_models() if n.startswith("i3d_"))
    assert get_model_entry("resnet50_gc_r16").defaults["reduction"] == 16


def test_duplicate_names_fail() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50", resnet18)
    with pytest.raises(TypeError, match="no options"):
        register_model("resnet18_colourful", resnet18, {"colour": "red"})
    assert "resnet18_colourful" not in list_models()


def test_unknown_names_and_options_fail_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"did you mean \['resnet50'"):
        create_model("resnet5O")
    with pytest.raises(TypeError, match=r"unknown options \['ratio'\].*'reduction'"):
        create_model("resnet50", ratio=16)


def test_options_override_presets() -> None:
    """The issue's example call, and a named configuration with one option changed."""
    model = create_model("resnet18", context="gc", stages=(False, True, True, True), reduction=16)
    assert model.layer1[0].context is None and model.layer2[0].context.reduction == 16
    with torch.device("meta"):
        r8 = create_model("resnet50_gc_r16", reduction=8, num_classes=10)
    assert r8.layer3[0].context.reduction == 8 and r8.fc.out_features == 10
    assert isinstance(
        create_model("resnet18", context=lambda c: nn.Identity()).layer2[0].context, nn.Identity
    )
