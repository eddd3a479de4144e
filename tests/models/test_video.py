"""C2D / I3D video ResNets: 2D-checkpoint loading and inflation, static clips, NL placement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcnet.blocks import GlobalContext, NonLocal
from gcnet.models import create_model, inflate_conv_weight, load_pretrained
from tests.models.helpers import randomize_

NL_VIDEO = {"scale": "inner", "subsample": True, "subsample_at": "input"}  # as the zoo's video NL models
NL5 = ((), (1, 3), (1, 3, 5), ())


def static_clip(frame: Tensor, frames: int) -> Tensor:
    """(B, C, H, W) -> (B, C, T, H, W) of T identical frames."""
    return frame.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


def pair(name_2d: str, name_video: str, options_2d: dict | None = None) -> tuple[nn.Module, nn.Module]:
    """A randomised 2D net in float64 and a video net loaded from its state dict (strictly)."""
    net_2d = randomize_(create_model(name_2d, **(options_2d or {}))).double().eval()
    video = create_model(name_video, num_classes=1000).double().eval()
    assert load_pretrained(video, net_2d.state_dict(), "torchvision", strict=True).exact
    return net_2d, video


@pytest.mark.parametrize(
    "name_2d, name_video, options_2d",
    [
        ("resnet50_gc_r16", "c2d_resnet50_gc", None),
        ("resnet50", "c2d_resnet50_nl5", {"nonlocal_indices": NL5, "nonlocal_options": NL_VIDEO}),
    ],
)
def test_c2d_on_a_static_clip_equals_the_2d_net(
    name_2d: str, name_video: str, options_2d: dict | None
) -> None:
    """C2D from a 2D checkpoint on T identical frames gives the 2D net's logits on that frame:
    kernels are 1 x k x k, max pooling over copies is the identity, a GC block's softmax over
    T x H x W positions and a non-local block's attention over T copies pool the same context."""
    net_2d, c2d = pair(name_2d, name_video, options_2d)
    frame = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(c2d(static_clip(frame, 4)), net_2d(frame), rtol=1e-10, atol=1e-10)


def replicate_time_padding_(model: nn.Module) -> None:
    """Make every temporal conv pad time by repeating border frames instead of zeros."""

    def pad(module: nn.Conv3d, args: tuple[Tensor]) -> tuple[Tensor]:
        t = module.kernel_size[0] // 2
        return (F.pad(args[0], (0, 0, 0, 0, t, t), mode="replicate"),)

    for m in model.modules():
        if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1:
            m.padding = (0, *m.padding[1:])
            m.register_forward_pre_hook(pad)


@pytest.fixture(scope="module")
def resnet50_and_i3d() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return pair("resnet50", "i3d_resnet50")


def test_inflated_kernels_sum_over_time_to_the_2d_kernel(resnet50_and_i3d) -> None:
    net_2d, i3d = resnet50_and_i3d
    assert i3d.conv1.weight.shape == (64, 3, 5, 7, 7)
    assert i3d.layer1[0].conv1.weight.shape[2] == 3 and i3d.layer2[1].conv1.weight.shape[2] == 1
    for name in ("conv1", "layer1.0.conv1", "layer4.1.conv1"):
        inflated = i3d.get_submodule(name).weight
        assert inflated.shape[2] > 1
        torch.testing.assert_close(
            inflated.sum(dim=2), net_2d.get_submodule(name).weight, rtol=1e-12, atol=1e-14
        )
    kernel = torch.randn(8, 4, 3, 3)
    assert inflate_conv_weight(kernel, 3).shape == (8, 4, 3, 3, 3)


def test_i3d_on_a_static_clip_differs_from_2d_only_by_temporal_padding(resnet50_and_i3d) -> None:
    """With zero temporal padding the I3D net stays close to the 2D net on a static clip; with
    border frames repeated instead, it equals the 2D net: the difference is only the padding."""
    net_2d, i3d = resnet50_and_i3d
    frame = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    clip = static_clip(frame, 8)
    with torch.no_grad():
        expected = net_2d(frame)
        zero_padded = i3d(clip)
        replicated = create_model("i3d_resnet50", num_classes=1000).double().eval()
        replicated.load_state_dict(i3d.state_dict())
        replicate_time_padding_(replicated)
        torch.testing.assert_close(replicated(clip), expected, rtol=1e-10, atol=1e-10)
    relative = (zero_padded - expected).norm() / expected.norm()
    assert 0 < relative < 0.05
    cosine = F.cosine_similarity(zero_padded.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.999


def test_i3d_temporal_kernels_follow_the_nl_paper() -> None:
    with torch.device("meta"):
        i3d = create_model("i3d_resnet50")
        i3d_333 = create_model("i3d_resnet50", inflate="3x3x3")
    kernels = [[b.conv1.kernel_size[0] for b in getattr(i3d, f"layer{i}")] for i in range(1, 5)]
    assert kernels == [[3, 3, 3], [3, 1, 3, 1], [3, 1, 3, 1, 3, 1], [1, 3, 1]]
    kernels_333 = [[b.conv2.kernel_size for b in getattr(i3d_333, f"layer{i}")] for i in range(1, 5)]
    assert kernels_333[3] == [(1, 3, 3), (3, 3, 3), (1, 3, 3)]
    assert all(b.conv1.kernel_size == (1, 1, 1) for b in i3d_333.layer2)


def test_nonlocal_settings_of_the_nl_paper() -> None:
    with torch.device("meta"):
        counts = {n: create_model(f"c2d_resnet50_nl{n}") for n in (1, 5, 10)}
    placed = {
        n: [list(getattr(m, f"layer{i}").nonlocal_blocks) for i in range(1, 5)] for n, m in counts.items()
    }
    assert placed[1] == [[], [], ["4"], []]
    assert placed[5] == [[], ["1", "3"], ["1", "3", "5"], []]
    assert placed[10] == [[], ["0", "1", "2", "3"], ["0", "1", "2", "3", "4", "5"], []]
    block = counts[5].layer2.nonlocal_blocks["1"]
    assert isinstance(block, NonLocal) and block.dims == 3 and block.subsample
    with torch.device("meta"):
        gc = create_model("i3d_resnet50_gc")
    assert gc.layer1[0].context is None and isinstance(gc.layer4[2].context, GlobalContext)


def test_video_feature_maps_and_errors() -> None:
    model = create_model("c2d_resnet50", num_classes=0).eval()
    with torch.no_grad():
        features = model.feature_maps(torch.randn(1, 3, 4, 64, 64))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "c2": (1, 256, 4, 16, 16),
        "c3": (1, 512, 2, 8, 8),
        "c4": (1, 1024, 2, 4, 4),
        "c5": (1, 2048, 2, 2, 2),
    }
    with pytest.raises(ValueError, match="T >= 2"):
        model(torch.randn(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects input \(B, C, T, H, W\) with C=3, got shape \(1, 3, 32, 32\); for single images"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match=r"unknown options \['inflate'\]"):
        create_model("c2d_resnet50", inflate="3x3x3")
    with pytest.raises(TypeError, match="unknown options"):
        create_model("c2d_resnet50", temporal_kernels=((3, 1),))


def test_paper_layout_gives_table_1_temporal_sizes() -> None:
    """NL paper Table 1 (C2D ResNet-50, 32 x 224 x 224 clips): conv1 16, pool1 8, res2 8, pool2 and
    res3-res5 4 frames; the 8x8 layout halves time once; Slow-only keeps all 8 frames."""
    paper = create_model("c2d_resnet50", layout="paper", num_classes=0).eval()
    sizes = {}
    hooks = [getattr(paper, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[2]))
             for n in ("conv1", "maxpool", "layer1", "temporal_pool", "layer2", "layer3", "layer4")]
    with torch.no_grad():
        paper(torch.randn(1, 3, 32, 32, 32))
    for hook in hooks:
        hook.remove()
    assert sizes == {"conv1": 16, "maxpool": 8, "layer1": 8, "temporal_pool": 4,
                     "layer2": 4, "layer3": 4, "layer4": 4}
    assert paper.frames_per_stage(32) == {"conv1": 16, "pool1": 8, "c2": 8, "c3": 4, "c4": 4, "c5": 4}
    with torch.device("meta"):
        released = create_model("i3d_resnet50")
        mmaction2 = create_model("i3d_resnet50", layout="mmaction2")
        slow = create_model("slowonly_resnet50")
    assert released.frames_per_stage(8) == {"conv1": 8, "pool1": 8, "c2": 8, "c3": 4, "c4": 4, "c5": 4}
    assert mmaction2.frames_per_stage(32) == paper.frames_per_stage(32)
    assert slow.frames_per_stage(8) == dict.fromkeys(("conv1", "pool1", "c2", "c3", "c4", "c5"), 8)
    assert (paper.min_frames, released.min_frames, slow.min_frames) == (7, 2, 1)
    assert "Table 1" in paper.describe(32) and "res3-res5 4" in paper.describe(32)
    with pytest.raises(ValueError, match="layout 'paper'.*T >= 7"):
        paper(torch.randn(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="layout 'slow' is Slow-only's own"):
        create_model("c2d_resnet50", layout="slow")


def test_slowonly_follows_slowfast_and_gc_goes_into_res3_to_res5() -> None:
    """SlowFast Table 1, Slow pathway: conv1 1x7x7, pool1 1x3x3, temporal kernel 3 in the first
    1x1 of every res4 / res5 block only; GCNet adds GC r16 to every block of res3-res5."""
    with torch.device("meta"):
        slow = create_model("slowonly_resnet50")
        gc = create_model("slowonly_resnet50_gc")
        nl5 = create_model("slowonly_resnet50_nl5")
    assert slow.conv1.kernel_size == (1, 7, 7) and slow.maxpool.kernel_size == (1, 3, 3)
    kernels = [[b.conv1.kernel_size[0] for b in getattr(slow, f"layer{i}")] for i in range(1, 5)]
    assert kernels == [[1, 1, 1], [1, 1, 1, 1], [3] * 6, [3] * 3]
    assert all(b.conv2.kernel_size == (1, 3, 3) for i in range(1, 5) for b in getattr(slow, f"layer{i}"))
    assert [sum(b.context is not None for b in getattr(gc, f"layer{i}")) for i in range(1, 5)] == [0, 4, 6, 3]
    assert gc.layer2[0].context.reduction == 16 and gc.layer2[0].context.channels == 512
    placed = [list(getattr(nl5, f"layer{i}").nonlocal_blocks) for i in range(1, 5)]
    assert placed == [[], ["1", "3"], ["1", "3", "5"], []]
    with pytest.raises(TypeError, match="unknown options \\['layout'\\]"):
        create_model("slowonly_resnet50", layout="8x8")


def gc_parameters(channels: int, reduction: int = 16) -> int:
    """GC block weights from the paper: W_k (C -> 1, bias), W_v1 (C -> C/r), LayerNorm, W_v2 (C/r -> C)."""
    hidden = channels // reduction
    return (channels + 1) + (channels * hidden + hidden) + 2 * hidden + (hidden * channels + channels)


def test_slowonly_parameter_counts_printed_by_info(capsys) -> None:
    """`gcnet info` prints the Slow-only parameter counts, checked against counts derived from
    torchvision's ResNet-50: a 400-class fc, and res4 / res5's first 1x1 convs made 3x1x1 (the
    32.45M that pytorchvideo publishes for Slow R50 8x8), plus 13 GC r16 blocks for the GC model."""
    import torchvision

    from gcnet.cli import main

    resnet50 = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    temporal = 2 * (512 * 256 + 5 * 1024 * 256 + 1024 * 512 + 2 * 2048 * 512)  # res4, res5 conv1 x 3
    slow = resnet50 - (2048 * 1000 + 1000) + (2048 * 400 + 400) + temporal
    gc = slow + 4 * gc_parameters(512) + 6 * gc_parameters(1024) + 3 * gc_parameters(2048)
    assert round(slow / 1e6, 2) == 32.45
    for name, expected in (("slowonly_resnet50", slow), ("slowonly_resnet50_gc", gc)):
        assert main(["info", name]) == 0
        total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
        assert total.split()[4] == f"{expected / 1e6:.3f}", (name, total)
