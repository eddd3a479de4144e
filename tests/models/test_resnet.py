"""ResNet/ResNeXt/CIFAR ResNet structure: parameter counts, block positions, NL placement, features."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from gcnet.blocks import GlobalContext
from gcnet.models import BasicBlock, Bottleneck, create_model
from tests.models.helpers import randomize_

TORCHVISION_ARCHS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
]


def gc_block_params(C: int, r: int) -> int:
    """The issue's count per GC block: W_k (C + 1), two Linear layers and a LayerNorm."""
    return 2 * C * C // r + 2 * C + 3 * C // r + 1


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **options: object) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **options)


def test_resnet50_parameter_counts_match_the_papers() -> None:
    base = n_params(meta_model("resnet50"))
    assert base == 25_557_032
    c3_c5 = [(512, 4), (1024, 6), (2048, 3)]  # (channels, blocks) of c3, c4, c5
    for r, paper in ((16, 28.08), (4, 35.6)):
        with_gc = n_params(meta_model(f"resnet50_gc_r{r}"))
        assert with_gc - base == sum(n * gc_block_params(C, r) for C, n in c3_c5)
        assert round(with_gc / 1e6, 2 if r == 16 else 1) == paper
    assert round(n_params(meta_model("resnet50_se")) / 1e6, 2) == 28.09  # SENet: 28.09M


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_layout_names_and_shapes(arch: str) -> None:
    """Same state-dict keys and shapes as torchvision's model, so its weights load strictly."""
    with torch.device("meta"):
        ours = create_model(arch).state_dict()
        theirs = getattr(torchvision.models, arch)().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_cifar_resnet20_is_he_et_al() -> None:
    model = create_model("cifar_resnet20", num_classes=10)
    assert n_params(model) == 269_722  # option-A shortcuts: no shortcut parameters
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert model.conv1.out_channels == 16 and model.fc.in_features == 64
    assert create_model("cifar_resnet20", shortcut="projection").layer2[0].downsample is not None
    assert [len(create_model(f"cifar_resnet{d}").layer1) for d in (32, 44, 56, 110)] == [5, 7, 9, 18]


def test_cifar_resnet20_call_of_the_training_engine() -> None:
    """The engine builds models as create_model("cifar_resnet20", num_classes=10, context="gc", ...)."""
    model = create_model(
        "cifar_resnet20", num_classes=10, context="gc", reduction=4, stages=(True, True, True)
    )
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    assert all(isinstance(b.context, GlobalContext) and b.context.reduction == 4 for b in blocks)
    assert create_model("cifar_resnet20", context="se").layer1[0].context is None  # default: stages 2-3
    assert create_model("cifar_resnet20", context="nl").layer3[0].context.dims == 2
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


class Recorder(nn.Module):
    """Identity that keeps its input, to see where a block sits and what it receives."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.seen: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x.clone()
        return x


@pytest.mark.parametrize("position", ["before_add", "after_3x3", "after_add"])
@pytest.mark.parametrize("block_type", [BasicBlock, Bottleneck])
def test_context_block_positions(block_type: type, position: str) -> None:
    """The block receives exactly the tensor of the paper's position (GCNet Table 2(c))."""
    downsample = nn.Sequential(
        nn.Conv2d(8, 4 * block_type.expansion, 1, 2, bias=False), nn.BatchNorm2d(4 * block_type.expansion)
    )
    block = block_type(8, 4, 2, downsample, context=Recorder, position=position).eval()
    randomize_(block)
    x = torch.randn(2, 8, 6, 6)
    out = block(x)
    relu = torch.relu
    if block_type is Bottleneck:
        mid = relu(block.bn2(block.conv2(relu(block.bn1(block.conv1(x))))))
        branch = block.bn3(block.conv3(mid))
    else:
        mid = relu(block.bn1(block.conv1(x)))
        branch = block.bn2(block.conv2(mid))
    expected = {"after_3x3": mid, "before_add": branch, "after_add": relu(branch + downsample(x))}[position]
    torch.testing.assert_close(block.context.seen, expected)
    torch.testing.assert_close(out, relu(branch + downsample(x)))
    assert block.context.channels == expected.shape[1]


def test_position_set_later_moves_the_context_block() -> None:
    """`position` takes effect when set, after construction too (as `insert_context_blocks` does)."""
    block = randomize_(BasicBlock(4, 4, context=Recorder, position="before_add")).eval()
    block.position = "after_add"
    out = block(torch.randn(2, 4, 6, 6))
    torch.testing.assert_close(block.context.seen, out)
    with pytest.raises(ValueError, match=r"unknown position 'after_1x1'; expected one of \['before_add'"):
        block.position = "after_1x1"


def test_context_changes_the_output_at_its_position() -> None:
    """A non-identity (randomised) GC block changes the output, so the slot is really used."""
    for position in ("before_add", "after_3x3", "after_add"):
        model = create_model("resnet18", num_classes=3, context="gc", reduction=4, position=position).eval()
        plain = create_model("resnet18", num_classes=3).eval()
        randomize_(model)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".context." not in k})
        x = torch.randn(1, 3, 32, 32)
        assert not torch.allclose(model(x), plain(x))


def test_stages_choose_where_blocks_go() -> None:
    model = create_model("resnet18", context="gc", stages=(True, False, True, False))
    has = [[b.context is not None for b in getattr(model, f"layer{i}")] for i in range(1, 5)]
    assert has == [[True, True], [False, False], [True, True], [False, False]]
    gc = create_model("resnet50_gc_r16")
    assert gc.layer1[0].context is None and gc.layer3[5].context.channels == 1024
    assert "layer3.5.context.add_transform.3.weight" in gc.state_dict()


def test_nonlocal_blocks_sit_between_residual_blocks() -> None:
    """resnet50_nl1: one NL block after block 4 of c4, fed by that block's output; indices of the
    residual blocks (and so torchvision's keys) do not shift."""
    model = create_model("resnet50_nl1").eval()
    assert list(model.layer3.nonlocal_blocks) == ["4"] and len(model.layer3) == 6
    assert "layer3.5.conv1.weight" in model.state_dict()
    assert "layer3.nonlocal_blocks.4.theta.weight" in model.state_dict()
    seen = {}
    model.layer3[4].register_forward_hook(lambda m, i, o: seen.__setitem__("block4", o.clone()))
    model.layer3.nonlocal_blocks["4"].register_forward_hook(
        lambda m, i, o: seen.__setitem__("nl_in", i[0].clone())
    )
    model.layer3[5].register_forward_hook(lambda m, i, o: seen.__setitem__("block5_in", i[0].clone()))
    with torch.no_grad():
        randomize_(model.layer3.nonlocal_blocks)
        model(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(seen["nl_in"], seen["block4"])
    assert not torch.allclose(seen["block5_in"], seen["block4"])  # the NL output feeds block 5
    custom = create_model("resnet18", nonlocal_indices=((0,), (), (1,), ()), nonlocal_block="gc")
    assert isinstance(custom.layer3.nonlocal_blocks["1"], GlobalContext)


def test_feature_maps_for_detection() -> None:
    model = create_model("resnet50_gc_r16", num_classes=0)
    features = model.feature_maps(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "c2": (1, 256, 16, 24),
        "c3": (1, 512, 8, 12),
        "c4": (1, 1024, 4, 6),
        "c5": (1, 2048, 2, 3),
    }
    assert model.feature_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)  # num_classes=0: pooled features


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"stages": (True, True, True)}, ValueError, "4 bools"),
        ({"stages": "all"}, TypeError, "sequence"),
        ({"context": "gc", "position": "after_1x1"}, ValueError, "before_add"),
        ({"context": "gcx"}, ValueError, "unknown block"),
        ({"context": "gc", "context_options": {"ratio": 16}}, TypeError, "unknown options"),
        ({"reduction": 4}, ValueError, "without a block"),
        ({"nonlocal_indices": ((), (), (6,), ())}, ValueError, r"nonlocal_indices\[2\] holds 6; .* 0\.\.5"),
        ({"nonlocal_indices": ((), ())}, ValueError, "nonlocal_indices must hold 4 sequences"),
        ({"num_classes": -1}, ValueError, "num_classes"),
        ({"colour": "red"}, TypeError, "unknown options"),
    ],
)
def test_bad_options_raise_clear_errors(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        create_model("resnet50", **options)


def test_bad_inputs_raise_clear_errors() -> None:
    model = create_model("resnet18", num_classes=2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 2, 32, 32\); for clips use a video model"):
        model(torch.randn(1, 3, 2, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0]])
