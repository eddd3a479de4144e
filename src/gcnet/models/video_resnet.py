"""C2D and I3D ResNets for video clips, with non-local blocks between residual blocks and GC blocks inside.

Wang et al., "Non-local Neural Networks", arXiv:1711.07971, Sec. 4: C2D processes a clip frame by
frame with 1 x k x k kernels (so ImageNet ResNet weights load directly); only pooling layers mix
time. I3D inflates kernels over time: the first 1x1 of every other residual block becomes 3x1x1
(I3D 3x1x1) or the 3x3 becomes 3x3x3 (I3D 3x3x3), and conv1 becomes 5x7x7; a 2D kernel is inflated
by repeating it over time and dividing by the temporal length, so a static clip gives the 2D
response away from the temporal borders.

    C2D / I3D ResNet-50: conv1 (kt x 7 x 7, stride 1, 2, 2), max pool 1x3x3 / (1, 2, 2), res2,
    temporal max pool 2x1x1 / (2, 1, 1), res3, res4, res5, global average pool, dropout, fc.

Pooling follows the released code (video-nonlocal-net, SlowFast): time is halved once, after res2.
Temporal kernels of I3D follow SlowFast: res2 all 3, res3 and res4 alternate 3, 1, res5 1, 3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn
from typing_extensions import Unpack

from gcnet._checks import check_choice, check_input, check_positive_int
from gcnet.blocks import ContextFactory
from gcnet.models._checks import CLIP_INPUT_HINTS, check_indices, check_stages
from gcnet.models._options import BlockOptions, ContextSpec, Position, context_factory, nonlocal_factory
from gcnet.models.resnet import FEATURE_NAMES, Bottleneck, init_weights, make_head, make_stage

Inflate = Literal["3x1x1", "3x3x3"]
INFLATES: tuple[str, ...] = ("3x1x1", "3x3x3")
# Which residual blocks get a temporal kernel of 3, per stage, repeated over the stage's blocks.
I3D_PATTERN: tuple[tuple[int, ...], ...] = ((1,), (1, 0), (1, 0), (0, 1))
I3D_STEM_TEMPORAL_KERNEL = 5


def i3d_temporal_kernels(layers: Sequence[int], inflate: Inflate) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per stage and block, the temporal kernels (first 1x1, 3x3) of the NL paper's I3D."""
    check_choice("inflate", inflate, INFLATES)
    kernels = []
    for depth, pattern in zip(layers, I3D_PATTERN):
        stage = []
        for i in range(depth):
            t = 3 if pattern[i % len(pattern)] else 1
            stage.append((t, 1) if inflate == "3x1x1" else (1, t))
        kernels.append(tuple(stage))
    return tuple(kernels)


class VideoResNet(nn.Module):
    """C2D/I3D ResNet: conv1 + 1x3x3 max pool -> res2 -> 2x1x1 max pool -> res3..res5 -> pool -> fc.

    Args:
        layers: Bottleneck blocks per stage, four ints ((3, 4, 6, 3) for ResNet-50).
        num_classes: outputs of fc (400 for Kinetics); 0 leaves fc as Identity.
        in_channels: input channels.
        stem_temporal_kernel: temporal size of conv1 (1 for C2D, 5 for I3D).
        temporal_kernels: per stage and block, temporal kernels (first 1x1, 3x3); None is C2D.
        context: constructor (channels -> module) of the context block in residual blocks, or None.
        stages: which of the four stages (res2..res5) get context blocks.
        position: "before_add" (default), "after_3x3" or "after_add"; see `Bottleneck`.
        nonlocal_block: constructor of the block put between residual blocks (non-local).
        nonlocal_indices: per stage, indices of the residual blocks that a `nonlocal_block` follows.
        dropout: dropout before fc (0.5 in the NL paper).
        zero_init_residual: zero the last BN of every residual branch.

    Shape:
        input (B, in_channels, T, H, W) with T >= 2; output (B, num_classes). `feature_maps`
        gives c2 at (T, H / 4, W / 4) and c3..c5 at (T / 2, H / s, W / s), s = 8, 16, 32.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        num_classes: int = 400,
        in_channels: int = 3,
        stem_temporal_kernel: int = 1,
        temporal_kernels: Sequence[Sequence[Sequence[int]]] | None = None,
        context: ContextFactory | None = None,
        stages: Sequence[bool] = (False, True, True, True),
        position: Position = "before_add",
        nonlocal_block: ContextFactory | None = None,
        nonlocal_indices: Sequence[Sequence[int]] | None = None,
        dropout: float = 0.5,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must hold 4 stage depths, got {tuple(layers)!r}")
        depths = [check_positive_int(f"layers[{i}]", d) for i, d in enumerate(layers)]
        stages = check_stages(stages, 4)
        indices = check_indices("nonlocal_indices", nonlocal_indices, depths)
        if temporal_kernels is not None and len(temporal_kernels) != 4:
            raise ValueError(f"temporal_kernels must hold 4 stages, got {len(temporal_kernels)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels = check_positive_int("in_channels", in_channels)
        kt = check_positive_int("stem_temporal_kernel", stem_temporal_kernel)
        self.conv1 = nn.Conv3d(in_channels, 64, (kt, 7, 7), (1, 2, 2), (kt // 2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.temporal_pool = nn.MaxPool3d((2, 1, 1), (2, 1, 1))
        channels = 64
        self.feature_channels: dict[str, int] = {}
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            stage = make_stage(
                Bottleneck,
                channels,
                planes,
                depth,
                stride=1 if i == 0 else 2,
                context=context if stages[i] else None,
                position=position,
                nonlocal_block=nonlocal_block,
                nonlocal_indices=indices[i],
                dims=3,
                temporal_kernels=None if temporal_kernels is None else temporal_kernels[i],
            )
            self.add_module(f"layer{i + 1}", stage)
            channels = planes * Bottleneck.expansion
            self.feature_channels[FEATURE_NAMES[i]] = channels
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.dropout = nn.Dropout(dropout)
        self.num_features = channels
        self.fc = make_head(channels, num_classes)
        init_weights(self, zero_init_residual)

    def feature_maps(self, x: Tensor) -> dict[str, Tensor]:
        """c2..c5 as (B, C_k, T_k, H_k, W_k); time is halved between c2 and c3."""
        check_input(type(self).__name__, x, self.in_channels, (5,), CLIP_INPUT_HINTS)
        if x.shape[2] < 2:
            raise ValueError(
                f"{type(self).__name__} expects clips of T >= 2 frames, got shape {tuple(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(self.temporal_pool(c2))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}

    def forward(self, x: Tensor) -> Tensor:
        c5 = self.feature_maps(x)["c5"]
        return self.fc(self.dropout(self.avgpool(c5).flatten(1)))  # (B, C) -> (B, num_classes)


class VideoResNetOptions(BlockOptions, total=False):
    """Options every C2D builder accepts (see `build_video_resnet`)."""

    dropout: float


class I3DOptions(VideoResNetOptions, total=False):
    """Options of the I3D builders: those of C2D and the inflation style."""

    inflate: Inflate


def build_video_resnet(
    layers: Sequence[int],
    *,
    i3d: bool,
    inflate: Inflate = "3x1x1",
    num_classes: int = 400,
    in_channels: int = 3,
    context: ContextSpec = None,
    reduction: int | None = None,
    context_options: Mapping[str, Any] | None = None,
    stages: Sequence[bool] = (False, True, True, True),
    position: Position = "before_add",
    nonlocal_indices: Sequence[Sequence[int]] | None = None,
    nonlocal_block: ContextSpec = "nl",
    nonlocal_options: Mapping[str, Any] | None = None,
    dropout: float = 0.5,
    zero_init_residual: bool = False,
) -> VideoResNet:
    """Build a C2D (`i3d=False`) or I3D video ResNet from names and options (as `build_resnet`).

    Context and non-local blocks work on (B, C, T, H, W): a GC block pools one context over all
    T x H x W positions; a non-local block gets `dims=3` unless `nonlocal_options` say otherwise.
    """
    factory = context_factory(context, reduction, context_options, dims=3)
    make_nonlocal = nonlocal_factory(nonlocal_block, nonlocal_indices, nonlocal_options, dims=3)
    if not i3d and inflate != "3x1x1":
        raise ValueError(f"inflate applies to I3D only; C2D keeps 2D kernels, got inflate={inflate!r}")
    return VideoResNet(
        layers,
        num_classes=num_classes,
        in_channels=in_channels,
        stem_temporal_kernel=I3D_STEM_TEMPORAL_KERNEL if i3d else 1,
        temporal_kernels=i3d_temporal_kernels(layers, inflate) if i3d else None,
        context=factory,
        stages=stages,
        position=position,
        nonlocal_block=make_nonlocal,
        nonlocal_indices=nonlocal_indices,
        dropout=dropout,
        zero_init_residual=zero_init_residual,
    )


def c2d_resnet50(**options: Unpack[VideoResNetOptions]) -> VideoResNet:
    """C2D ResNet-50: 2D kernels on every frame, temporal max pooling only."""
    return build_video_resnet((3, 4, 6, 3), i3d=False, **options)


def c2d_resnet101(**options: Unpack[VideoResNetOptions]) -> VideoResNet:
    """C2D ResNet-101: 2D kernels on every frame, temporal max pooling only."""
    return build_video_resnet((3, 4, 23, 3), i3d=False, **options)


def i3d_resnet50(**options: Unpack[I3DOptions]) -> VideoResNet:
    """I3D ResNet-50: 5x7x7 conv1 and 3x1x1 (or 3x3x3) kernels in every other residual block."""
    return build_video_resnet((3, 4, 6, 3), i3d=True, **options)


def i3d_resnet101(**options: Unpack[I3DOptions]) -> VideoResNet:
    """I3D ResNet-101: 5x7x7 conv1 and 3x1x1 (or 3x3x3) kernels in every other residual block."""
    return build_video_resnet((3, 4, 23, 3), i3d=True, **options)
