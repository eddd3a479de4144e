"""Detectors on gcnet backbones: parameter counts, equivalence with torchvision, freezing, weight loading."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

from gcnet.detection import create_detector, freeze_layers, resnet_fpn_backbone
from gcnet.models import create_model, load_for_finetuning


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mask_rcnn_r50_fpn_parameters_match_torchvision_and_gc_adds_its_blocks() -> None:
    """Mask R-CNN R50-FPN, 91 classes: 44,401,393 parameters, torchvision's (frozen BN holds no parameters).

    GCNet (arXiv:1904.11492, Table 4) reports 44.4M -> 46.9M with GC r16 in c3-c5; here the GC
    model has 46,923,134 = 44,401,393 + 2,521,741, exactly the GC blocks' parameters.
    """
    plain = create_detector("mask_rcnn", "resnet50", 91)
    assert count(plain) == MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["num_params"] == 44_401_393
    gc = create_detector("mask_rcnn", "resnet50", 91, context="gc", reduction=16)
    blocks = sum(p.numel() for n, p in gc.named_parameters() if ".context." in n)
    assert count(gc) - count(plain) == blocks == 2_521_741
    assert round(count(gc) / 1e6, 1) == 46.9
    # Trainable BatchNorm: the same count as torchvision's randomly initialised model.
    unfrozen = create_detector("mask_rcnn", "resnet50", 91, frozen_bn=False)
    assert count(unfrozen) == count(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)) == 44_454_513


def test_r50_fpn_mask_rcnn_matches_torchvision_with_the_same_weights() -> None:
    """torchvision's maskrcnn_resnet50_fpn state dict loads key for key and gives the same outputs (eval).

    With BatchNorm2d the detections are bit-identical; with FrozenBatchNorm2d (which folds scale and
    shift in another order) the FPN features agree to float rounding.
    """
    small = {
        "min_size": 96,
        "max_size": 128,
        "box_score_thresh": 0.0,
        "rpn_post_nms_top_n_test": 100,
        "box_detections_per_img": 20,
    }
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **small).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up of BN layers would show
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    images = [torch.rand(3, 80, 100)]
    with torch.no_grad():
        expected = reference(images)[0]
        features_ref = reference.backbone(reference.transform(images)[0].tensors)
    assert expected["boxes"].shape[0] > 0
    for frozen_bn in (False, True):
        ours = create_detector(
            "mask_rcnn", "resnet50", 91, frozen_bn=frozen_bn, trainable_layers=5, min_size=96, max_size=128
        )
        ours.roi_heads.score_thresh, ours.roi_heads.detections_per_img = 0.0, 20
        ours.rpn._post_nms_top_n["testing"] = 100
        ours.load_state_dict(reference.state_dict(), strict=True)
        ours.eval()
        with torch.no_grad():
            if frozen_bn:
                features = ours.backbone(ours.transform(images)[0].tensors)
                for key, value in features_ref.items():
                    scale = value.abs().max().item()
                    torch.testing.assert_close(features[key], value, rtol=1e-4, atol=1e-5 * scale)
                continue
            actual = ours(images)[0]
        for key in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_frozen_batchnorm_and_trainable_layers_follow_torchvision() -> None:
    fpn = resnet_fpn_backbone("resnet18", context="gc", reduction=4, trainable_layers=3, fpn_channels=32)
    body = fpn.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert (
        sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 20
    )  # stem 1 + 8 blocks x 2 + 3 shortcuts
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert all(p.requires_grad for n, p in body.named_parameters() if ".context." in n)  # c3-c5 blocks train
    out = fpn(torch.rand(1, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"] and out["0"].shape == (1, 32, 16, 16)


def test_freezing_a_stage_with_blocks_is_reported() -> None:
    body = create_model("resnet18", num_classes=0, context="se", reduction=4, stages=(True, True, True, True))
    frozen = freeze_layers(body, 3)
    assert frozen and all(n.startswith("layer1.") for n in frozen)
    with pytest.raises(ValueError, match="trainable_layers"):
        freeze_layers(body, 6)


def _as_mmdet_detector(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gcnet GC keys -> the official GCNet / mmdetection detector layout (backbone.*, context_block, 1x1 convs)."""
    out = {"neck.lateral_convs.0.conv.weight": torch.zeros(1), "rpn_head.rpn_conv.weight": torch.zeros(1)}
    for key, value in state.items():
        if ".context." in key:
            block, rest = key.split(".context.")
            head, tail = rest.split(".", 1)
            name = {
                "key": "conv_mask",
                "add_transform": "channel_add_conv",
                "scale_transform": "channel_mul_conv",
            }[head]
            if value.dim() == 2:
                value = value[:, :, None, None]  # Linear (O, I) -> 1x1 conv (O, I, 1, 1)
            elif value.dim() == 1 and ".1." in f".{tail}":
                value = value[:, None, None]  # LayerNorm (C/r,) -> ([C/r, 1, 1])
            key = f"{block}.context_block.{name}.{tail}"
        out[f"backbone.{key}"] = value
    return out


def test_backbone_weights_from_torchvision_and_from_an_mmdet_gc_detector() -> None:
    imagenet = tv_resnet18().state_dict()  # has fc.*, which a detector backbone drops
    fpn = resnet_fpn_backbone(
        "resnet18",
        context="gc",
        reduction=4,
        weights=imagenet,
        frozen_bn=False,
        trainable_layers=5,
        fpn_channels=16,
    )
    torch.testing.assert_close(fpn.body.layer3[1].conv2.weight, imagenet["layer3.1.conv2.weight"])

    source = create_model("resnet18", num_classes=0, context="gc", reduction=4)
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-1, 1)
    fpn = resnet_fpn_backbone(
        "resnet18",
        context="gc",
        reduction=4,
        weights=_as_mmdet_detector(source.state_dict()),
        weights_source="mmdet",
        frozen_bn=False,
        trainable_layers=5,
        fpn_channels=16,
    )
    for key, value in source.state_dict().items():
        torch.testing.assert_close(fpn.body.state_dict()[key], value, msg=key)


def test_backbone_weights_that_do_not_fit_are_refused_by_name() -> None:
    body = create_model("resnet18", num_classes=0)
    wrong = create_model("resnet34", num_classes=0).state_dict()
    with pytest.raises(ValueError, match="layer1.2.conv1.weight"):
        load_for_finetuning(body, wrong)
    with pytest.raises(ValueError, match="expected one of"):
        load_for_finetuning(body, wrong, source="caffe")  # type: ignore[arg-type]


def test_bad_arguments_name_what_is_expected() -> None:
    with pytest.raises(ValueError, match="unknown detection backbone 'cifar_resnet20'"):
        resnet_fpn_backbone("cifar_resnet20")
    with pytest.raises(ValueError, match="unknown architecture"):
        create_detector("retinanet", "resnet18", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        create_detector("faster_rcnn", "resnet18", 1)
    with pytest.raises(ValueError, match="given twice"):
        resnet_fpn_backbone("resnet18", context="gc", backbone_options={"context": "se"})
    with pytest.raises(TypeError, match="unknown options"):
        resnet_fpn_backbone("resnet18", backbone_options={"contxt": "gc"})


@pytest.mark.parametrize(
    "options",
    [
        {"context": "gc", "reduction": 16},
        {"context": "se", "reduction": 16, "stages": (True,) * 4},
        {"context": "snl"},
        {
            "nonlocal_indices": ((), (), (1,), ()),
            "backbone_options": {"nonlocal_options": {"scale": "inner"}},
        },
    ],
    ids=["gc_r16_c3c5", "se_all", "snl_c3c5", "nl_c4"],
)
def test_every_block_kind_builds_a_working_backbone(options: dict) -> None:
    fpn = resnet_fpn_backbone("resnet18", trainable_layers=5, fpn_channels=8, **options)
    names = [n for n, _ in fpn.body.named_modules()]
    assert any(n.endswith(".context") or ".nonlocal_blocks." in n for n in names)
    out = fpn(torch.rand(1, 3, 64, 64))
    assert out["3"].shape == (1, 8, 2, 2) and torch.isfinite(out["pool"]).all()
