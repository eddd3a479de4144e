"""Video ResNets: the Non-local paper's C2D / I3D and SlowFast's Slow-only, with NL and GC blocks.

Wang et al., "Non-local Neural Networks", arXiv:1711.07971, Sec. 4: C2D processes a clip frame by
frame with 1 x k x k kernels (so ImageNet ResNet weights load directly); only pooling layers mix
time. I3D inflates kernels over time: the first 1x1 of every other residual block becomes 3x1x1
(I3D 3x1x1) or the 3x3 becomes 3x3x3 (I3D 3x3x3), and conv1 becomes 5x7x7; a 2D kernel is inflated
by repeating it over time and dividing by the temporal length, so a static clip gives the 2D
response away from the temporal borders. Temporal kernels of I3D follow the released code: res2
all 3, res3 and res4 alternate 3, 1, res5 1, 3.

C2D / I3D come in the two temporal layouts of the released code (video-nonlocal-net):

    layout   conv1 stride  pool1 (max)           pool2 (max)      time per stage, T frames in
    "paper"  2, 2, 2       2x3x3, stride 2,2,2   2x1x1, stride 2  conv1 T/2, res2 T/4, res3-5 T/8
    "8x8"    1, 2, 2       1x3x3, stride 1,2,2   2x1x1, stride 2  res2 T, res3-5 T/2
    "mmaction2" 2, 2, 2    1x3x3, stride 2,2,2   2x1x1, stride 2  as "paper"

"paper" is `resnet_video_org.py`, "the original model architectures used in the paper" for
32-frame clips: a 32-frame clip gives the paper's Table 1 sizes (16, 8, 8, 4, 4, 4). Table 1 lists
3x3x3 and 3x1x1 pooling kernels; the code (whose weights were released) pools 2x3x3 and 2x1x1,
which gives the same sizes. "8x8" is `resnet_video.py`, the repository's faster variant for
8-frame clips (stride 8), and the default. "mmaction2" is mmaction2's I3D (`ResNet3d` with
conv1_stride_t=2, pool1_stride_t=2), whose pool1 drops every other frame instead of taking a max.

Slow-only (Feichtenhofer et al., "SlowFast Networks", arXiv:1812.03982, Table 1, the Slow pathway
alone): conv1 1x7x7, pool1 1x3x3, no temporal down-sampling anywhere; the first 1x1 of every block
of res4 and res5 is 3x1x1. GCNet's Kinetics experiments (arXiv:1904.11492, Sec. 5.3) add their
blocks to this network.
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
Layout = Literal["paper", "8x8", "mmaction2", "slow"]
LAYOUTS: tuple[str, ...] = ("paper", "8x8", "mmaction2", "slow")
# layout -> (conv1 temporal stride, pool1 temporal kernel, pool1 temporal stride, 2x1x1 max pool after res2)
LAYOUT_TIME: dict[str, tuple[int, int, int, bool]] = {
    "paper": (2, 2, 2, True),
    "8x8": (1, 1, 1, True),
    "mmaction2": (2, 1, 2, True),
    "slow": (1, 1, 1, False),
}
LAYOUT_NAMES: dict[str, str] = {
    "paper": "NL paper (Table 1, released resnet_video_org.py; 32-frame clips)",
    "8x8": "NL released 8x8 variant (resnet_video.py; 8-frame clips)",
    "mmaction2": "mmaction2's I3D (32x2 clips; pool1 keeps every other frame)",
    "slow": "Slow-only (SlowFast; no temporal down-sampling)",
}
# Which residual blocks get a temporal kernel of 3, per stage, repeated over the stage's blocks.
I3D_PATTERN: tuple[tuple[int, ...], ...] = ((1,), (1, 0), (1, 0), (0, 1))
SLOWONLY_PATTERN: tuple[tuple[int, ...], ...] = ((0,), (0,), (1,), (1,))
I3D_STEM_TEMPORAL_KERNEL = 5


def pattern_temporal_kernels(
    layers: Sequence[int], pattern: Sequence[Sequence[int]], inflate: Inflate = "3x1x1"
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per stage and block, the temporal kernels (first 1x1, 3x3) where `pattern` puts a 3."""
    check_choice("inflate", inflate, INFLATES)
    kernels = []
    for depth, stage_pattern in zip(layers, pattern):
        stage = []
        for i in range(depth):
            t = 3 if stage_pattern[i % len(stage_pattern)] else 1
            stage.append((t, 1) if inflate == "3x1x1" else (1, t))
        kernels.append(tuple(stage))
    return tuple(kernels)


class VideoResNet(nn.Module):
    """Video ResNet: conv1 + max pool -> res2 -> (2x1x1 max pool) -> res3..res5 -> pool -> fc.

    Args:
        layers: Bottleneck blocks per stage, four ints ((3, 4, 6, 3) for ResNet-50).
        num_classes: outputs of fc (400 for Kinetics); 0 leaves fc as Identity.
        in_channels: input channels.
        stem_temporal_kernel: temporal size of conv1 (1 for C2D and Slow-only, 5 for I3D).
        layout: where time is down-sampled: "paper", "8x8", "mmaction2" or "slow" (module docstring).
        stem_pool_padding: spatial padding of the max pool after conv1; 1 as torchvision and
            mmaction2, 0 as the released Caffe2 code (56 vs 55 positions after a 224 crop).
        temporal_kernels: per stage and block, temporal kernels (first 1x1, 3x3); None is C2D.
        context: constructor (channels -> module) of the context block in residual blocks, or None.
        stages: which of the four stages (res2..res5) get context blocks.
        position: "before_add" (default), "after_3x3" or "after_add"; see `Bottleneck`.
        nonlocal_block: constructor of the block put between residual blocks (non-local).
        nonlocal_indices: per stage, indices of the residual blocks that a `nonlocal_block` follows.
        dropout: dropout before fc (0.5 in the NL paper).
        zero_init_residual: zero the last BN of every residual branch.

    Shape:
        input (B, in_channels, T, H, W); output (B, num_classes). `feature_maps` gives c2..c5 at
        H / s, W / s (s = 4, 8, 16, 32) and the frames of `frames_per_stage(T)`.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        num_classes: int = 400,
        in_channels: int = 3,
        stem_temporal_kernel: int = 1,
        layout: Layout = "8x8",
        stem_pool_padding: int = 1,
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
        if stem_pool_padding not in (0, 1):
            raise ValueError(f"stem_pool_padding must be 0 or 1, got {stem_pool_padding!r}")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.layout: Layout = check_choice("layout", layout, LAYOUTS)
        kt = check_positive_int("stem_temporal_kernel", stem_temporal_kernel)
        conv1_stride, pool1_time, pool1_stride, temporal_pool = LAYOUT_TIME[layout]
        self.conv1 = nn.Conv3d(in_channels, 64, (kt, 7, 7), (conv1_stride, 2, 2), (kt // 2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        p = stem_pool_padding
        self.maxpool = nn.MaxPool3d((pool1_time, 3, 3), (pool1_stride, 2, 2), (0, p, p))
        self.temporal_pool = nn.MaxPool3d((2, 1, 1), (2, 1, 1)) if temporal_pool else nn.Identity()
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
        # The shortest clip that leaves at least one time step in c5.
        self.min_frames = next(t for t in range(1, 1024) if min(self.frames_per_stage(t).values()) >= 1)

    def frames_per_stage(self, frames: int) -> dict[str, int]:
        """Time steps after conv1, pool1 and each stage for a clip of `frames` frames."""
        kt, st, pt = self.conv1.kernel_size[0], self.conv1.stride[0], self.conv1.padding[0]
        sizes = {"conv1": (frames + 2 * pt - kt) // st + 1}
        k, s = self.maxpool.kernel_size[0], self.maxpool.stride[0]
        sizes["pool1"] = sizes["c2"] = (sizes["conv1"] - k) // s + 1
        c3 = sizes["c2"] // 2 if isinstance(self.temporal_pool, nn.MaxPool3d) else sizes["c2"]
        sizes.update(c3=c3, c4=c3, c5=c3)
        return sizes

    def describe(self, frames: int) -> str:
        """One line: the temporal layout and the time steps per stage for `frames` input frames."""
        sizes = self.frames_per_stage(frames)
        return (f"temporal layout {self.layout!r}: {LAYOUT_NAMES[self.layout]}; frames {frames} -> conv1 "
                f"{sizes['conv1']}, pool1 {sizes['pool1']}, res2 {sizes['c2']}, res3-res5 {sizes['c3']}")

    def feature_maps(self, x: Tensor) -> dict[str, Tensor]:
        """c2..c5 as (B, C_k, T_k, H_k, W_k)."""
        check_input(type(self).__name__, x, self.in_channels, (5,), CLIP_INPUT_HINTS)
        if x.shape[2] < self.min_frames:
            raise ValueError(
                f"{type(self).__name__} (layout {self.layout!r}) expects clips of T >= {self.min_frames} "
                f"frames, got shape {tuple(x.shape)}"
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
    """Options every video builder accepts (see `build_video_resnet`)."""

    dropout: float
    stem_pool_padding: int


class C2DOptions(VideoResNetOptions, total=False):
    """Options of the C2D builders: those of every video net and the temporal layout."""

    layout: Layout


class I3DOptions(C2DOptions, total=False):
    """Options of the I3D builders: those of C2D and the inflation style."""

    inflate: Inflate


Kind = Literal["c2d", "i3d", "slowonly"]


def build_video_resnet(
    layers: Sequence[int],
    *,
    kind: Kind,
    layout: Layout = "8x8",
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
    stem_pool_padding: int = 1,
    zero_init_residual: bool = False,
) -> VideoResNet:
    """Build a C2D, I3D or Slow-only video ResNet from names and options (as `build_resnet`).

    Context and non-local blocks work on (B, C, T, H, W): a GC block pools one context over all
    T x H x W positions; a non-local block gets `dims=3` unless `nonlocal_options` say otherwise.
    """
    check_choice("kind", kind, ("c2d", "i3d", "slowonly"))
    factory = context_factory(context, reduction, context_options, dims=3)
    make_nonlocal = nonlocal_factory(nonlocal_block, nonlocal_indices, nonlocal_options, dims=3)
    if kind != "i3d" and inflate != "3x1x1":
        raise ValueError(f"inflate applies to I3D only; {kind} has fixed kernels, got inflate={inflate!r}")
    if (kind == "slowonly") != (layout == "slow"):
        raise ValueError(f"layout 'slow' is Slow-only's own; C2D / I3D take 'paper', '8x8' or 'mmaction2', "
                         f"got kind={kind!r}, layout={layout!r}")
    pattern = {"c2d": None, "i3d": I3D_PATTERN, "slowonly": SLOWONLY_PATTERN}[kind]
    return VideoResNet(
        layers,
        num_classes=num_classes,
        in_channels=in_channels,
        stem_temporal_kernel=I3D_STEM_TEMPORAL_KERNEL if kind == "i3d" else 1,
        layout=layout,
        stem_pool_padding=stem_pool_padding,
        temporal_kernels=None if pattern is None else pattern_temporal_kernels(layers, pattern, inflate),
        context=factory,
        stages=stages,
        position=position,
        nonlocal_block=make_nonlocal,
        nonlocal_indices=nonlocal_indices,
        dropout=dropout,
        zero_init_residual=zero_init_residual,
    )


def c2d_resnet50(**options: Unpack[C2DOptions]) -> VideoResNet:
    """C2D ResNet-50 (NL paper): 2D kernels on every frame; layout "8x8" (default), "paper", "mmaction2"."""
    return build_video_resnet((3, 4, 6, 3), kind="c2d", **options)


def c2d_resnet101(**options: Unpack[C2DOptions]) -> VideoResNet:
    """C2D ResNet-101 (NL paper): 2D kernels on every frame; layout "8x8" (default), "paper", "mmaction2"."""
    return build_video_resnet((3, 4, 23, 3), kind="c2d", **options)


def i3d_resnet50(**options: Unpack[I3DOptions]) -> VideoResNet:
    """I3D ResNet-50 (NL paper): 5x7x7 conv1, 3x1x1 kernels in every other block; layout as C2D."""
    return build_video_resnet((3, 4, 6, 3), kind="i3d", **options)


def i3d_resnet101(**options: Unpack[I3DOptions]) -> VideoResNet:
    """I3D ResNet-101 (NL paper): 5x7x7 conv1, 3x1x1 kernels in every other block; layout as C2D."""
    return build_video_resnet((3, 4, 23, 3), kind="i3d", **options)


def slowonly_resnet50(**options: Unpack[VideoResNetOptions]) -> VideoResNet:
    """Slow-only ResNet-50 (SlowFast, GCNet's Kinetics baseline): 3x1x1 kernels in res4-res5, 8x8 clips."""
    return build_video_resnet((3, 4, 6, 3), kind="slowonly", layout="slow", **options)


def slowonly_resnet101(**options: Unpack[VideoResNetOptions]) -> VideoResNet:
    """Slow-only ResNet-101 (SlowFast): 3x1x1 kernels in res4-res5, no temporal down-sampling."""
    return build_video_resnet((3, 4, 23, 3), kind="slowonly", layout="slow", **options)
