"""Mask R-CNN and Faster R-CNN (torchvision's) on gcnet ResNet/ResNeXt-FPN backbones with context blocks.

Cao et al., "GCNet", arXiv:1904.11492, Table 4 (COCO): Mask R-CNN R50-FPN, GC r16 after the last
1x1 of every bottleneck in c3-c5, 44.4M -> 46.9M parameters. He et al., "Mask R-CNN",
arXiv:1703.06870; Lin et al., "Feature Pyramid Networks", arXiv:1612.03144.

    image -> gcnet ResNet (conv1, bn1, layer1..4 [+context]) -> c2..c5 -> FPN -> p2..p6
          -> RPN -> RoIAlign -> box head [-> mask head]

The gcnet ResNet keeps torchvision's attribute names, so torchvision's `BackboneWithFPN` wraps it
unchanged and a torchvision detector's state dict loads into a block-free gcnet detector key for
key. Freezing follows torchvision: BatchNorm2d becomes FrozenBatchNorm2d (statistics and affine as
buffers), and only the last `trainable_layers` of (layer4, layer3, layer2, layer1, conv1) train.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from gcnet.models import ResNet, create_model, list_models, load_for_finetuning

logger = logging.getLogger("gcnet.detection")

Architecture = Literal["mask_rcnn", "faster_rcnn"]
ARCHITECTURES: tuple[str, ...] = ("mask_rcnn", "faster_rcnn")
WeightsSource = Literal["torchvision", "mmdet", "timm", "gcnet"]
# Prefixes of the backbone parameters that torchvision unfreezes for trainable_layers = 1..5.
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def backbone_names() -> list[str]:
    """Registered 2D ResNet/ResNeXt names usable as detection backbones."""
    return [n for n in list_models() if n.startswith(("resnet", "resnext"))]


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d under `module` by a FrozenBatchNorm2d holding the same statistics.

    Only 2D batch norms are frozen (torchvision's detection backbones); the context blocks' own
    norms (LayerNorm, BatchNorm1d) keep training. Returns `module` (or the replacement if it is one).
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats and module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)  # type: ignore[arg-type]
        return frozen
    for name, child in module.named_children():
        replacement = convert_frozen_batchnorm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def freeze_layers(body: nn.Module, trainable_layers: int) -> list[str]:
    """Freeze all but the last `trainable_layers` of (layer4, layer3, layer2, layer1, conv1) as torchvision.

    5 trains everything (bn1 included), 0 nothing. Returns the names of context / non-local block
    parameters that end up frozen, since a freshly initialised block that never trains is likely a
    mistake (the caller logs them).
    """
    if (
        not isinstance(trainable_layers, int)
        or isinstance(trainable_layers, bool)
        or not 0 <= trainable_layers <= 5
    ):
        raise ValueError(f"trainable_layers must be an int in 0..5, got {trainable_layers!r}")
    prefixes = list(_TRAINABLE_ORDER[:trainable_layers]) + (["bn1"] if trainable_layers == 5 else [])
    frozen_blocks = []
    for name, parameter in body.named_parameters():
        if not any(name.startswith(p) for p in prefixes):
            parameter.requires_grad_(False)
            if ".context." in name or ".nonlocal_blocks." in name:
                frozen_blocks.append(name)
    return frozen_blocks


def resnet_fpn_backbone(
    name: str = "resnet50",
    *,
    context: str | None = None,
    reduction: int | None = None,
    stages: Sequence[bool] | None = None,
    nonlocal_indices: Sequence[Sequence[int]] | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | Mapping[str, Tensor] | None = None,
    weights_source: WeightsSource = "torchvision",
    trainable_layers: int = 3,
    frozen_bn: bool = True,
    fpn_channels: int = 256,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
) -> BackboneWithFPN:
    """A gcnet ResNet/ResNeXt with context blocks, optionally pretrained and frozen, under torchvision's FPN.

    Args:
        name: a registered ResNet/ResNeXt (`backbone_names()`), e.g. "resnet50", "resnet50_gc_r16".
        context, reduction, stages: context block per residual block ("gc", "se", "snl", "nl" or
            None), its bottleneck divisor, and which of c2..c5 get one; None keeps the named
            model's preset (c3-c5, GCNet's, for the plain ResNets).
        nonlocal_indices: per stage, residual blocks followed by a non-local block, e.g.
            ((), (), (4,), ()) for the NL paper's one block in c4.
        backbone_options: further `create_model` options (position, context_options, ...).
        weights, weights_source: a checkpoint path or state dict and its layout ("torchvision"
            ImageNet, "mmdet" official GCNet / mmdetection detector `backbone.*` keys, "timm",
            "gcnet"), loaded by `gcnet.models.load_for_finetuning`; None: random init.
        trainable_layers: 0..5 of (layer4, layer3, layer2, layer1, conv1) that train (torchvision).
        frozen_bn: turn BatchNorm2d into FrozenBatchNorm2d (after loading the weights).
        fpn_channels: channels of every FPN level (256 in the papers; smaller for quick tests).
        returned_layers: stages 1..4 fed to the FPN.

    Shape:
        input (B, 3, H, W); output an OrderedDict of FPN maps "0".."k-1" and "pool", fpn_channels each.
    """
    options = dict(backbone_options or {})
    for key, value in (
        ("context", context),
        ("reduction", reduction),
        ("nonlocal_indices", nonlocal_indices),
    ):
        if value is not None:
            if key in options:
                raise ValueError(f"{key!r} given twice: as an argument and in backbone_options")
            options[key] = value
    if "stages" in options and stages is not None:
        raise ValueError("'stages' given twice: as an argument and in backbone_options")
    if name not in backbone_names():
        raise ValueError(f"unknown detection backbone {name!r}; expected one of {backbone_names()}")
    if stages is not None:
        options["stages"] = tuple(stages)
    body = create_model(name, num_classes=0, **options)
    if weights is not None:
        load_for_finetuning(body, weights, weights_source)
    return fpn_backbone(body, trainable_layers=trainable_layers, frozen_bn=frozen_bn, fpn_channels=fpn_channels,
                        returned_layers=returned_layers)


def fpn_backbone(
    body: nn.Module,
    *,
    trainable_layers: int = 3,
    frozen_bn: bool = True,
    fpn_channels: int = 256,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
) -> BackboneWithFPN:
    """A built gcnet ResNet (weights loaded) frozen as torchvision does and put under its FPN.

    Args: as `resnet_fpn_backbone`.
    """
    if not isinstance(body, ResNet):
        raise TypeError(f"the detection backbone must be a gcnet ResNet, got {type(body).__name__}")
    if frozen_bn:
        convert_frozen_batchnorm(body)
    frozen_blocks = freeze_layers(body, trainable_layers)
    if frozen_blocks:
        logger.warning(
            "trainable_layers=%d freezes %d context/non-local block parameters (e.g. %s); "
            "they keep their initial values",
            trainable_layers,
            len(frozen_blocks),
            frozen_blocks[0],
        )
    layers = list(returned_layers)
    if (
        not layers
        or any(not isinstance(k, int) or not 1 <= k <= 4 for k in layers)
        or layers != sorted(set(layers))
    ):
        raise ValueError(
            f"returned_layers must be increasing stage numbers in 1..4, got {tuple(returned_layers)!r}"
        )
    if not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f"fpn_channels must be a positive int, got {fpn_channels!r}")
    channels = list(body.feature_channels.values())
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(layers)},
        in_channels_list=[channels[k - 1] for k in layers],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


Detector = MaskRCNN | FasterRCNN


def build_detector(
    architecture: Architecture,
    backbone: BackboneWithFPN,
    num_classes: int,
    *,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    box_batch_size_per_image: int = 512,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
) -> Detector:
    """torchvision's MaskRCNN or FasterRCNN on a built backbone, with the paper's (torchvision's) defaults.

    Args:
        architecture: "mask_rcnn" or "faster_rcnn".
        backbone: e.g. from `resnet_fpn_backbone`; needs an `out_channels` attribute.
        num_classes: including background (91 for COCO's category ids, K + 1 for K contiguous labels).
        min_size, max_size: the detector resizes the short side to min_size (a random choice of a
            sequence in training, multi-scale) keeping the long side <= max_size; boxes and masks
            follow, and predictions are mapped back to the input size.
        rpn_*, box_*: proposal counts, RoI sampling and output limits of torchvision's heads.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {list(ARCHITECTURES)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background + classes), got {num_classes!r}")
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"min_size must be a positive int or a list of them, got {min_size!r}")
    cls = MaskRCNN if architecture == "mask_rcnn" else FasterRCNN
    return cls(
        backbone,
        num_classes=num_classes,
        min_size=sizes,
        max_size=max_size,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=box_score_thresh,
        box_detections_per_img=box_detections_per_img,
    )


def create_detector(
    architecture: Architecture = "mask_rcnn",
    backbone: str = "resnet50",
    num_classes: int = 91,
    *,
    context: str | None = None,
    reduction: int | None = None,
    stages: Sequence[bool] | None = None,
    nonlocal_indices: Sequence[Sequence[int]] | None = None,
    backbone_options: Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | Mapping[str, Tensor] | None = None,
    weights_source: WeightsSource = "torchvision",
    trainable_layers: int = 3,
    frozen_bn: bool = True,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
) -> Detector:
    """One call for the common case, e.g. the paper's GC Mask R-CNN:

        create_detector("mask_rcnn", "resnet50", 91, context="gc", reduction=16)

    Arguments are those of `resnet_fpn_backbone` and `build_detector`; frozen BN and 3 trainable
    stages are torchvision's setting for a pretrained backbone.
    """
    fpn = resnet_fpn_backbone(
        backbone,
        context=context,
        reduction=reduction,
        stages=stages,
        nonlocal_indices=nonlocal_indices,
        backbone_options=backbone_options,
        weights=weights,
        weights_source=weights_source,
        trainable_layers=trainable_layers,
        frozen_bn=frozen_bn,
        fpn_channels=fpn_channels,
    )
    return build_detector(architecture, fpn, num_classes, min_size=min_size, max_size=max_size)
