"""ResNet and ResNeXt with context blocks at the papers' positions and blocks between residual blocks.

He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385; Xie et al., "Aggregated
Residual Transformations" (ResNeXt), arXiv:1611.05431; Cao et al., "GCNet", arXiv:1904.11492;
Wang et al., "Non-local Neural Networks", arXiv:1711.07971.

    residual block:  y = ReLU(x + F(x))
    GCNet default:   y = ReLU(x + GC(F(x)))     (GC after the last conv + BN of F, "before_add")
    after the 3x3:   the block goes inside F, after its 3x3 conv + BN + ReLU ("after_3x3")
    after the add:   y = GC(ReLU(x + F(x)))     ("after_add")

Attribute names follow torchvision (`conv1, bn1, layer1..4, downsample, fc`, blocks indexed 0..n-1
inside a stage), so torchvision's ImageNet weights load strictly; the blocks add `context` inside a
residual block and `nonlocal_blocks.<i>` inside a stage (a block after residual block i). Blocks are
dimension-generic (`dims=2` images, `dims=3` clips), which the video nets reuse.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

from torch import Tensor, nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)
from typing_extensions import Unpack

from gcnet._checks import check_choice, check_input, check_positive_int
from gcnet.blocks import ContextFactory, GlobalContext
from gcnet.blocks._fused import block_ends_fused, residual_relu
from gcnet.models._checks import IMAGE_INPUT_HINTS, check_indices, check_stages
from gcnet.models._options import BlockOptions, ContextSpec, Position, context_factory, nonlocal_factory

POSITIONS: tuple[str, ...] = ("before_add", "after_3x3", "after_add")
FEATURE_NAMES: tuple[str, ...] = ("c2", "c3", "c4", "c5")


def conv_nd(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    temporal_kernel: int = 1,
    temporal_stride: int = 1,
) -> nn.Module:
    """A bias-free k x k conv with 'same' padding: Conv2d, or Conv3d with a (kt, k, k) kernel."""
    if dims == 2:
        return nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False)
    if dims == 3:
        return nn.Conv3d(
            in_channels,
            out_channels,
            (temporal_kernel, kernel, kernel),
            (temporal_stride, stride, stride),
            (temporal_kernel // 2, kernel // 2, kernel // 2),
            groups=groups,
            bias=False,
        )
    raise ValueError(f"dims must be 2 (images) or 3 (clips), got {dims!r}")


def batch_norm(dims: int, channels: int) -> nn.Module:
    """BatchNorm2d for images, BatchNorm3d for clips."""
    return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)


def _check_temporal(temporal_kernels: Sequence[int], dims: int) -> tuple[int, int]:
    if len(temporal_kernels) != 2 or any(k < 1 or k % 2 == 0 for k in temporal_kernels):
        raise ValueError(f"temporal_kernels must be two odd ints >= 1, got {tuple(temporal_kernels)!r}")
    if dims == 2 and tuple(temporal_kernels) != (1, 1):
        raise ValueError(
            f"temporal_kernels apply to dims=3 only, got {tuple(temporal_kernels)!r} with dims=2"
        )
    return (temporal_kernels[0], temporal_kernels[1])


class _ContextSlot(nn.Module):
    """A residual block with an optional `context` block at one of POSITIONS.

    Setting `position` (at construction, or when a block is inserted later) sets one flag per
    position, so forward tests bools, which tracing and torch.compile see as constants, not strings.
    """

    context: nn.Module | None

    @property
    def position(self) -> str:
        return self._position

    @position.setter
    def position(self, position: str) -> None:
        self._position = check_choice("position", position, POSITIONS)
        self._after_3x3 = position == "after_3x3"
        self._before_add = position == "before_add"
        self._after_add = position == "after_add"

    def _context_if(self, here: bool, out: Tensor) -> Tensor:
        return self.context(out) if here and self.context is not None else out

    def _add_relu(self, out: Tensor, identity: Tensor) -> Tensor:
        """ReLU(out + identity), through the context block first where it sits before the add.

        One pass where the CPU kernels apply; a GC/SE/SNL block there fuses its add or scale into it
        too, unless hooks on it must see its own output.
        """
        context = self.context if self._before_add else None
        if not block_ends_fused():
            return self.relu(out + identity if context is None else context(out) + identity)
        if context is None:
            return residual_relu(out, identity)
        if _fusable(context):
            return context.forward_residual(out, identity)
        return residual_relu(context(out), identity)


def _fusable(module: nn.Module) -> bool:
    """A GlobalContext whose forward is the library's and that no hook (its own or global) watches."""
    if not isinstance(module, GlobalContext) or type(module).forward is not GlobalContext.forward:
        return False
    return not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _global_forward_hooks or _global_forward_pre_hooks
        or _global_backward_hooks or _global_backward_pre_hooks
    )


class BasicBlock(_ContextSlot):
    """BasicBlock: 3x3 [+context after_3x3], 3x3 [+context before_add], add, ReLU [+context after_add].

    Args:
        in_channels: input channels.
        planes: channels of both 3x3 convs and of the output (expansion 1).
        stride: stride of the first 3x3 conv.
        downsample: module mapping the input to the output shape for the shortcut, or None.
        groups, width_per_group: must be 1 and 64 (kept for a signature shared with Bottleneck).
        context: constructor (channels -> module) of the context block, or None for none.
        position: where the context block goes: "before_add" (default), "after_3x3", "after_add".
        dims: 2 for (B, C, H, W) images, 3 for (B, C, T, H, W) clips.
        temporal_kernels: temporal kernel sizes of the two convs (dims=3 only; 1 keeps a 2D kernel).

    Shape:
        input (B, in_channels, *positions), output (B, planes, *positions / stride).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        context: ContextFactory | None = None,
        position: Position = "before_add",
        dims: int = 2,
        temporal_kernels: Sequence[int] = (1, 1),
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError(
                f"BasicBlock supports groups=1, width_per_group=64 only, got {groups}, {width_per_group}; "
                "use Bottleneck for ResNeXt"
            )
        self.position = position
        t1, t2 = _check_temporal(temporal_kernels, dims)
        self.conv1 = conv_nd(dims, in_channels, planes, 3, stride, temporal_kernel=t1)
        self.bn1 = batch_norm(dims, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_nd(dims, planes, planes, 3, temporal_kernel=t2)
        self.bn2 = batch_norm(dims, planes)
        self.downsample = downsample
        self.stride = stride
        self.context = None if context is None else context(planes)

    @property
    def out_channels(self) -> int:
        return self.bn2.num_features

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self._context_if(self._after_3x3, out)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self._add_relu(out, identity)
        return self._context_if(self._after_add, out)


class Bottleneck(_ContextSlot):
    """Bottleneck: 1x1, 3x3 [+context after_3x3], 1x1 [+context before_add], add, ReLU [+context after_add].

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"). ResNeXt makes the 3x3 grouped.

    Args:
        in_channels: input channels.
        planes: base width; the output has planes * 4 channels, the 3x3 conv
            int(planes * width_per_group / 64) * groups.
        stride: stride of the 3x3 conv.
        downsample: module mapping the input to the output shape for the shortcut, or None.
        groups: cardinality of the 3x3 conv (ResNeXt).
        width_per_group: channels per group at planes=64 (64 for ResNet, 4 or 8 for ResNeXt).
        context: constructor (channels -> module) of the context block, or None for none.
        position: where the context block goes: "before_add" (default), "after_3x3", "after_add".
        dims: 2 for (B, C, H, W) images, 3 for (B, C, T, H, W) clips.
        temporal_kernels: temporal kernel sizes of the first 1x1 and of the 3x3 (dims=3 only):
            (3, 1) is the NL paper's I3D 3x1x1 block, (1, 3) its I3D 3x3x3 block.

    Shape:
        input (B, in_channels, *positions), output (B, planes * 4, *positions / stride).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        context: ContextFactory | None = None,
        position: Position = "before_add",
        dims: int = 2,
        temporal_kernels: Sequence[int] = (1, 1),
    ) -> None:
        super().__init__()
        self.position = position
        t1, t2 = _check_temporal(temporal_kernels, dims)
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        self.conv1 = conv_nd(dims, in_channels, width, 1, temporal_kernel=t1)
        self.bn1 = batch_norm(dims, width)
        self.conv2 = conv_nd(dims, width, width, 3, stride, groups, temporal_kernel=t2)
        self.bn2 = batch_norm(dims, width)
        self.conv3 = conv_nd(dims, width, out_channels, 1)
        self.bn3 = batch_norm(dims, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.context = (
            None if context is None else context(width if position == "after_3x3" else out_channels)
        )

    @property
    def out_channels(self) -> int:
        return self.bn3.num_features

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self._context_if(self._after_3x3, out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self._add_relu(out, identity)
        return self._context_if(self._after_add, out)


ResidualBlock = Union[BasicBlock, Bottleneck]


class ResNetStage(nn.Module):
    """One stage: residual blocks 0..n-1 in sequence, with a block (e.g. non-local) after chosen ones.

    Residual blocks are children "0".."n-1" as in torchvision's nn.Sequential, so their weights keep
    torchvision's keys; the blocks in between live in `nonlocal_blocks["<i>"]` (after residual block
    i), never shifting those indices. Indexing, len() and iteration see the residual blocks.

    Args:
        blocks: the residual blocks.
        nonlocal_blocks: block to run after residual block i, keyed by i.

    Shape:
        input and output (B, C, *positions) as the residual blocks define them.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], nonlocal_blocks: Mapping[int, nn.Module] | None = None
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("a stage needs at least one residual block")
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)
        self._depth = len(blocks)
        inserted = dict(nonlocal_blocks or {})
        bad = [i for i in inserted if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"nonlocal_blocks indices {bad} outside 0..{len(blocks) - 1}")
        self.nonlocal_blocks = nn.ModuleDict({str(i): inserted[i] for i in sorted(inserted)})

    def __len__(self) -> int:
        return self._depth

    def __getitem__(self, index: int) -> nn.Module:
        if not -self._depth <= index < self._depth:
            raise IndexError(f"stage has {self._depth} residual blocks, got index {index}")
        return self._modules[str(index % self._depth)]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._modules[str(i)] for i in range(self._depth))  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self._depth):
            x = self._modules[str(i)](x)  # type: ignore[misc]
            if str(i) in self.nonlocal_blocks:
                x = self.nonlocal_blocks[str(i)](x)
        return x


def make_stage(
    block: type[ResidualBlock],
    in_channels: int,
    planes: int,
    depth: int,
    stride: int,
    *,
    groups: int = 1,
    width_per_group: int = 64,
    context: ContextFactory | None = None,
    position: Position = "before_add",
    nonlocal_block: ContextFactory | None = None,
    nonlocal_indices: Sequence[int] = (),
    dims: int = 2,
    temporal_kernels: Sequence[Sequence[int]] | None = None,
    shortcut: nn.Module | None = None,
) -> ResNetStage:
    """Build one stage; the first block takes the stride and a 1x1 conv + BN shortcut if shapes change.

    A `nonlocal_block` follows each residual block in `nonlocal_indices`. `shortcut` replaces that
    1x1 conv + BN (the CIFAR nets' parameter-free shortcut).
    """
    if nonlocal_indices and nonlocal_block is None:
        raise ValueError(f"nonlocal_indices {tuple(nonlocal_indices)} given but no nonlocal_block to insert")
    out_channels = planes * block.expansion
    downsample = shortcut
    if downsample is None and (stride != 1 or in_channels != out_channels):
        downsample = nn.Sequential(
            conv_nd(dims, in_channels, out_channels, 1, stride), batch_norm(dims, out_channels)
        )
    kernels = temporal_kernels if temporal_kernels is not None else [(1, 1)] * depth
    if len(kernels) != depth:
        raise ValueError(f"temporal_kernels has {len(kernels)} entries for a stage of {depth} blocks")
    blocks = []
    for i in range(depth):
        blocks.append(
            block(
                in_channels if i == 0 else out_channels,
                planes,
                stride if i == 0 else 1,
                downsample if i == 0 else None,
                groups=groups,
                width_per_group=width_per_group,
                context=context,
                position=position,
                dims=dims,
                temporal_kernels=kernels[i],
            )
        )
    inserted = {} if nonlocal_block is None else {i: nonlocal_block(out_channels) for i in nonlocal_indices}
    return ResNetStage(blocks, inserted)


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's init of the backbone: convs Kaiming (fan-out), BatchNorm2d/3d weight 1, bias 0.

    Context and non-local blocks keep their own `reset_parameters` (their norms are BatchNorm1d and
    LayerNorm, which this leaves alone). `zero_init_residual` zeroes the last BN of every branch.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


def make_head(in_features: int, num_classes: int) -> nn.Module:
    """fc of the classifier; num_classes=0 gives Identity (a backbone returning pooled features)."""
    check_positive_int("num_classes", num_classes, minimum=0)
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class ResNet(nn.Module):
    """ResNet: 7x7/2 conv, 3x3/2 max pool -> layer1..4 [+context, +blocks between] -> avg pool -> fc.

    Args:
        block: BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50 and deeper, ResNeXt).
        layers: residual blocks per stage, four ints.
        num_classes: outputs of fc; 0 leaves fc as Identity and forward returns pooled features.
        in_channels: input channels.
        groups, width_per_group: ResNeXt cardinality and group width (1, 64 for ResNet).
        context: constructor (channels -> module) of the context block in residual blocks, or None.
        stages: which of the four stages (c2..c5) get context blocks; GCNet uses c3-c5.
        position: "before_add" (after the last conv + BN of the residual branch, the papers'
            default), "after_3x3", or "after_add".
        nonlocal_block: constructor of the block put between residual blocks (the NL paper's placement).
        nonlocal_indices: per stage, indices of the residual blocks that a `nonlocal_block` follows.
        zero_init_residual: zero the last BN of every residual branch (torchvision's option).

    Shape:
        input (B, in_channels, H, W); output (B, num_classes), or (B, 512 * expansion) when
        num_classes=0. `feature_maps` gives c2..c5 at strides 4, 8, 16, 32.
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        context: ContextFactory | None = None,
        stages: Sequence[bool] = (False, True, True, True),
        position: Position = "before_add",
        nonlocal_block: ContextFactory | None = None,
        nonlocal_indices: Sequence[Sequence[int]] | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must hold 4 stage depths, got {tuple(layers)!r}")
        depths = [check_positive_int(f"layers[{i}]", d) for i, d in enumerate(layers)]
        stages = check_stages(stages, 4)
        indices = check_indices("nonlocal_indices", nonlocal_indices, depths)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        self.feature_channels: dict[str, int] = {}
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            stage = make_stage(
                block,
                channels,
                planes,
                depth,
                stride=1 if i == 0 else 2,
                groups=groups,
                width_per_group=width_per_group,
                context=context if stages[i] else None,
                position=position,
                nonlocal_block=nonlocal_block,
                nonlocal_indices=indices[i],
            )
            self.add_module(f"layer{i + 1}", stage)
            channels = planes * block.expansion
            self.feature_channels[FEATURE_NAMES[i]] = channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = channels
        self.fc = make_head(channels, num_classes)
        init_weights(self, zero_init_residual)

    def feature_maps(self, x: Tensor) -> dict[str, Tensor]:
        """c2..c5 for detection: (B, C_k, H / s, W / s) at strides s = 4, 8, 16, 32."""
        check_input(type(self).__name__, x, self.in_channels, (4,), IMAGE_INPUT_HINTS)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = {}
        for name, layer in zip(FEATURE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            features[name] = x
        return features

    def forward(self, x: Tensor) -> Tensor:
        c5 = self.feature_maps(x)["c5"]
        return self.fc(self.avgpool(c5).flatten(1))  # (B, C) -> (B, num_classes)


class ResNetOptions(BlockOptions, total=False):
    """Options every ResNet/ResNeXt builder accepts (see `build_resnet`)."""


def build_resnet(
    block: type[ResidualBlock],
    layers: Sequence[int],
    *,
    groups: int = 1,
    width_per_group: int = 64,
    num_classes: int = 1000,
    in_channels: int = 3,
    context: ContextSpec = None,
    reduction: int | None = None,
    context_options: Mapping[str, Any] | None = None,
    stages: Sequence[bool] = (False, True, True, True),
    position: Position = "before_add",
    nonlocal_indices: Sequence[Sequence[int]] | None = None,
    nonlocal_block: ContextSpec = "nl",
    nonlocal_options: Mapping[str, Any] | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build a ResNet from names and options; the only place where strings become blocks.

    Args:
        context: "gc", "snl", "se", "nl", a constructor taking channels, or None.
        reduction: shortcut for context_options={"reduction": r} (GC, SE).
        context_options: further options of the context block, e.g. {"fusion": "both"}.
        stages, position: see `ResNet`.
        nonlocal_indices: per stage, residual blocks after which a `nonlocal_block` is inserted,
            e.g. ((), (), (4,), ()) is the NL paper's one block before the last block of res4.
        nonlocal_block: the inserted block ("nl" by default; "gc" gives GCNet's "+1 GC" setting).
        nonlocal_options: options of the inserted block, e.g. {"mode": "dot_product"}.
    """
    factory = context_factory(context, reduction, context_options, dims=2)
    make_nonlocal = nonlocal_factory(nonlocal_block, nonlocal_indices, nonlocal_options, dims=2)
    return ResNet(
        block,
        layers,
        num_classes=num_classes,
        in_channels=in_channels,
        groups=groups,
        width_per_group=width_per_group,
        context=factory,
        stages=stages,
        position=position,
        nonlocal_block=make_nonlocal,
        nonlocal_indices=nonlocal_indices,
        zero_init_residual=zero_init_residual,
    )


def resnet18(**options: Unpack[ResNetOptions]) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]."""
    return build_resnet(BasicBlock, (2, 2, 2, 2), **options)


def resnet34(**options: Unpack[ResNetOptions]) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3]."""
    return build_resnet(BasicBlock, (3, 4, 6, 3), **options)


def resnet50(**options: Unpack[ResNetOptions]) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3]; 25,557,032 parameters with 1000 classes."""
    return build_resnet(Bottleneck, (3, 4, 6, 3), **options)


def resnet101(**options: Unpack[ResNetOptions]) -> ResNet:
    """ResNet-101: Bottleneck x [3, 4, 23, 3]."""
    return build_resnet(Bottleneck, (3, 4, 23, 3), **options)


def resnet152(**options: Unpack[ResNetOptions]) -> ResNet:
    """ResNet-152: Bottleneck x [3, 8, 36, 3]."""
    return build_resnet(Bottleneck, (3, 8, 36, 3), **options)


def resnext50_32x4d(**options: Unpack[ResNetOptions]) -> ResNet:
    """ResNeXt-50 32x4d: Bottleneck x [3, 4, 6, 3], 32 groups of width 4."""
    return build_resnet(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4, **options)


def resnext101_32x8d(**options: Unpack[ResNetOptions]) -> ResNet:
    """ResNeXt-101 32x8d: Bottleneck x [3, 4, 23, 3], 32 groups of width 8."""
    return build_resnet(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8, **options)
