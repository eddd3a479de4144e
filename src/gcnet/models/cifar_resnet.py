"""CIFAR ResNets of He et al. with context blocks, for training experiments at small scale.

He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385, Sec. 4.2:
a 3x3 conv with 16 channels, then 3 stages of n BasicBlocks with 16, 32, 64 channels (stride 2 at
the start of stages 2 and 3), global average pooling and fc; depth 6n + 2 (20, 32, 44, 56, 110).
Shortcuts that change shape are "option A": stride-2 subsampling and zero channel padding, no
parameters (ResNet-20 then has 269,722 parameters with 10 classes); "projection" uses 1x1 conv + BN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from gcnet._checks import check_choice, check_input, check_positive_int
from gcnet.blocks import ContextFactory
from gcnet.models._checks import IMAGE_INPUT_HINTS, check_indices, check_stages
from gcnet.models._options import BlockOptions, ContextSpec, Position, context_factory, nonlocal_factory
from gcnet.models.resnet import BasicBlock, init_weights, make_head, make_stage

Shortcut = Literal["pad", "projection"]
SHORTCUTS: tuple[str, ...] = ("pad", "projection")
WIDTHS: tuple[int, int, int] = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, zero-pad channels equally on both sides; no parameters.

    Args:
        in_channels: input channels.
        out_channels: output channels (>= in_channels).
        stride: spatial subsampling step.

    Shape:
        input (B, in_channels, H, W), output (B, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"PadShortcut pads channels; expected out_channels >= {in_channels}, got {out_channels}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H / s, W / s)
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))  # (B, C_out, H / s, W / s)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 conv 16 -> 3 stages of n BasicBlocks (16, 32, 64) [+context] -> avg pool -> fc.

    Args:
        blocks_per_stage: n; depth is 6n + 2.
        num_classes: outputs of fc; 0 leaves fc as Identity (forward returns pooled features).
        in_channels: input channels.
        context: constructor (channels -> module) of the context block, or None.
        stages: which of the 3 stages get context blocks; default all but the first, GCNet's c3-c5
            analogue (the first stage has 16 channels, too few for a reduction of 16 to mean much).
        position: "before_add" (default), "after_3x3" or "after_add"; see `BasicBlock`.
        nonlocal_block: constructor of a block put between residual blocks.
        nonlocal_indices: per stage, indices of the residual blocks that a `nonlocal_block` follows.
        shortcut: "pad" (option A, the paper's) or "projection" (1x1 conv + BN).
        zero_init_residual: zero the last BN of every residual branch.

    Shape:
        input (B, in_channels, H, W) (32 x 32 for CIFAR), output (B, num_classes).
    """

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        context: ContextFactory | None = None,
        stages: Sequence[bool] = (False, True, True),
        position: Position = "before_add",
        nonlocal_block: ContextFactory | None = None,
        nonlocal_indices: Sequence[Sequence[int]] | None = None,
        shortcut: Shortcut = "pad",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        n = check_positive_int("blocks_per_stage", blocks_per_stage)
        stages = check_stages(stages, 3)
        indices = check_indices("nonlocal_indices", nonlocal_indices, (n, n, n))
        check_choice("shortcut", shortcut, SHORTCUTS)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        channels = WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            stride = 1 if i == 0 else 2
            pad = PadShortcut(channels, width, stride) if shortcut == "pad" and channels != width else None
            stage = make_stage(
                BasicBlock,
                channels,
                width,
                n,
                stride,
                context=context if stages[i] else None,
                position=position,
                nonlocal_block=nonlocal_block,
                nonlocal_indices=indices[i],
                shortcut=pad,
            )
            self.add_module(f"layer{i + 1}", stage)
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = channels
        self.fc = make_head(channels, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.in_channels, (4,), IMAGE_INPUT_HINTS)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))  # (B, 64) -> (B, num_classes)


class CifarResNetOptions(BlockOptions, total=False):
    """Options every CIFAR ResNet builder accepts (see `build_cifar_resnet`)."""

    shortcut: Shortcut


def build_cifar_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    context: ContextSpec = None,
    reduction: int | None = None,
    context_options: Mapping[str, Any] | None = None,
    stages: Sequence[bool] = (False, True, True),
    position: Position = "before_add",
    nonlocal_indices: Sequence[Sequence[int]] | None = None,
    nonlocal_block: ContextSpec = "nl",
    nonlocal_options: Mapping[str, Any] | None = None,
    shortcut: Shortcut = "pad",
    zero_init_residual: bool = False,
) -> CifarResNet:
    """Build a CIFAR ResNet of `depth` = 6n + 2 from names and options (as `build_resnet`)."""
    check_positive_int("depth", depth)
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
    factory = context_factory(context, reduction, context_options, dims=2)
    make_nonlocal = nonlocal_factory(nonlocal_block, nonlocal_indices, nonlocal_options, dims=2)
    return CifarResNet(
        (depth - 2) // 6,
        num_classes=num_classes,
        in_channels=in_channels,
        context=factory,
        stages=stages,
        position=position,
        nonlocal_block=make_nonlocal,
        nonlocal_indices=nonlocal_indices,
        shortcut=shortcut,
        zero_init_residual=zero_init_residual,
    )


def cifar_resnet20(**options: Unpack[CifarResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-20: 3 x 3 BasicBlocks; 0.27M parameters."""
    return build_cifar_resnet(20, **options)


def cifar_resnet32(**options: Unpack[CifarResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-32: 3 x 5 BasicBlocks; 0.46M parameters."""
    return build_cifar_resnet(32, **options)


def cifar_resnet44(**options: Unpack[CifarResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-44: 3 x 7 BasicBlocks; 0.66M parameters."""
    return build_cifar_resnet(44, **options)


def cifar_resnet56(**options: Unpack[CifarResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-56: 3 x 9 BasicBlocks; 0.85M parameters."""
    return build_cifar_resnet(56, **options)


def cifar_resnet110(**options: Unpack[CifarResNetOptions]) -> CifarResNet:
    """CIFAR ResNet-110: 3 x 18 BasicBlocks; 1.7M parameters."""
    return build_cifar_resnet(110, **options)
