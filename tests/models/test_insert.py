"""Inserting blocks into existing torchvision / timm ResNets: outputs unchanged, keys interoperable."""

from __future__ import annotations

import pytest
import torch
import torchvision

from gcnet.blocks import GlobalContext
from gcnet.models import create_model, insert_context_blocks, load_pretrained
from tests.models.helpers import randomize_

POSITIONS = ["before_add", "after_3x3", "after_add"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("position", POSITIONS)
def test_torchvision_resnet_outputs_unchanged_at_insertion(arch: str, position: str) -> None:
    model = randomize_(getattr(torchvision.models, arch)()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    conv = model.layer3[0].conv1
    insert_context_blocks(model, "gc", reduction=4, position=position)
    assert model.layer3[0].conv1 is conv  # the pretrained modules themselves, not copies
    assert model.layer1[0].context is None and isinstance(model.layer4[1].context, GlobalContext)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.layer4[1].context.parameters())


def test_inserted_torchvision_model_has_gcnet_keys() -> None:
    """After insertion a torchvision ResNet-50's state dict loads strictly into resnet50_gc_r16."""
    model = insert_context_blocks(torchvision.models.resnet50(), "gc", reduction=16)
    assert load_pretrained(create_model("resnet50_gc_r16"), model.state_dict(), "torchvision").exact


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_torchvision_blocks_are_built_by_the_gcnet_init(arch: str) -> None:
    """Every attribute the gcnet block's __init__ sets is on the inserted block, with the value of
    the same gcnet model built directly; keys come in the same order."""
    model = insert_context_blocks(getattr(torchvision.models, arch)(), "gc", position="after_3x3")
    ours = create_model(arch, context="gc", position="after_3x3")
    for i in range(1, 5):
        for block, built in zip(getattr(model, f"layer{i}"), getattr(ours, f"layer{i}")):
            assert type(block) is type(built)
            assert vars(block).keys() == vars(built).keys()
            plain = {k: v for k, v in vars(built).items() if isinstance(v, (bool, int, str))}
            assert {k: vars(block)[k] for k in plain} == plain
    assert list(model.state_dict()) == list(ours.state_dict())


def test_gcnet_model_gets_blocks_at_the_position() -> None:
    """A gcnet ResNet with blocks inserted computes what one built with them there computes."""
    model = randomize_(create_model("resnet18", num_classes=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        insert_context_blocks(model, "gc", reduction=4, position="after_add")
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        randomize_(model)
        built = create_model("resnet18", num_classes=3, context="gc", reduction=4, position="after_add")
        built.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), built.eval()(x))


@pytest.mark.parametrize("position", POSITIONS)
def test_timm_resnet_outputs_unchanged_at_insertion(position: str) -> None:
    timm = pytest.importorskip("timm")
    model = randomize_(timm.create_model("resnet18")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    insert_context_blocks(model, "snl", stages=(True, True, True, True), position=position)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert sum(1 for m in model.modules() if isinstance(m, GlobalContext)) == 8


def test_timm_gc_slot_converts_back() -> None:
    """GC blocks in timm's `se` slot: the state dict converts back to gcnet keys (source "timm")."""
    timm = pytest.importorskip("timm")
    model = randomize_(insert_context_blocks(timm.create_model("resnet18"), "gc", reduction=4)).eval()
    assert "layer3.0.se.key.weight" in model.state_dict()
    ours = create_model("resnet18", context="gc", reduction=4).eval()
    assert load_pretrained(ours, model.state_dict(), "timm").exact
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x))


def test_blocks_that_change_the_output_are_refused() -> None:
    model = torchvision.models.resnet18()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="changes its input at initialisation"):
        insert_context_blocks(model, "se")
    assert list(model.state_dict()) == keys  # nothing inserted
    with pytest.raises(ValueError, match="already has a context block"):
        insert_context_blocks(create_model("resnet18", context="gc"), "gc")
    with pytest.raises(TypeError, match="layer1..layer4"):
        insert_context_blocks(torch.nn.Linear(2, 2), "gc")
    with pytest.raises(ValueError, match="before_add"):
        insert_context_blocks(model, "gc", position="after_1x1")
