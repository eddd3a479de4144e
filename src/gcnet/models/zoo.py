"""The registered models: plain backbones and the papers' named configurations, in one table.

GCNet (arXiv:1904.11492): GC r16 / r4 after the last 1x1 of every bottleneck in c3-c5;
    SNL in the same places (`resnet50_snl`) or as one block where the NL baseline has its one
    (`resnet50_snl1`); SE r16 in every block (SENet); one NL block before the last residual
    block of c4 (the NLNet baseline). Kinetics: Slow-only ResNet-50 (SlowFast) with GC r16 in
    every residual block of res3-res5, and 5 NL or SNL blocks at the NL paper's 5 places.
Non-local (arXiv:1711.07971), C2D / I3D ResNet-50 for video: 1 NL block (res4, before its last
    block), 5 (every other block of res3 and res4), 10 (every block of res3 and res4).
C2D / I3D with GC blocks (`c2d_resnet50_gc`, `i3d_resnet50_gc`) are gcnet combinations that
    neither paper evaluates. docs/papers.md maps every name to its paper row.
"""

from __future__ import annotations

from gcnet.models import cifar_resnet, resnet, video_resnet
from gcnet.models.registry import register_model

C3_C5 = (False, True, True, True)
ALL_STAGES = (True, True, True, True)
NL1_RESNET50 = ((), (), (4,), ())  # before the last of res4's 6 blocks
NL5_RESNET50 = ((), (1, 3), (1, 3, 5), ())  # every other block of res3 (4) and res4 (6)
NL10_RESNET50 = ((), (0, 1, 2, 3), (0, 1, 2, 3, 4, 5), ())  # every block of res3 and res4
# The released NL code: embedded Gaussian scaled by 1/sqrt(C'); video nets max-pool x by 1x2x2 before
# phi and g, where the released code pools (the paper's text pools their outputs).
NL_IMAGE = {"scale": "inner"}
NL_VIDEO = {"scale": "inner", "subsample": True, "subsample_at": "input"}

# Plain backbones, torchvision-compatible.
for _builder in (
    resnet.resnet18,
    resnet.resnet34,
    resnet.resnet50,
    resnet.resnet101,
    resnet.resnet152,
    resnet.resnext50_32x4d,
    resnet.resnext101_32x8d,
):
    register_model(_builder.__name__, _builder)

# GCNet's ImageNet configurations.
register_model(
    "resnet50_gc_r16",
    resnet.resnet50,
    {"context": "gc", "reduction": 16, "stages": C3_C5},
    "ResNet-50 + GC r16 in c3-c5 (GCNet); 28.08M parameters",
)
register_model(
    "resnet50_gc_r4",
    resnet.resnet50,
    {"context": "gc", "reduction": 4, "stages": C3_C5},
    "ResNet-50 + GC r4 in c3-c5 (GCNet); 35.6M parameters",
)
register_model(
    "resnet101_gc_r16",
    resnet.resnet101,
    {"context": "gc", "reduction": 16, "stages": C3_C5},
    "ResNet-101 + GC r16 in c3-c5 (GCNet)",
)
register_model(
    "resnet50_snl",
    resnet.resnet50,
    {"context": "snl", "stages": C3_C5},
    "ResNet-50 + simplified NL in every residual block of c3-c5 (GC's placement, SNL block)",
)
register_model(
    "resnet50_snl1",
    resnet.resnet50,
    {"nonlocal_indices": NL1_RESNET50, "nonlocal_block": "snl"},
    "ResNet-50 + 1 simplified NL block before the last block of c4 (GCNet's SNL at the NL place)",
)
register_model(
    "resnet50_se",
    resnet.resnet50,
    {"context": "se", "reduction": 16, "stages": ALL_STAGES},
    "SE-ResNet-50: SE r16 in every block (SENet)",
)
register_model(
    "resnet50_nl1",
    resnet.resnet50,
    {"nonlocal_indices": NL1_RESNET50, "nonlocal_options": NL_IMAGE},
    "ResNet-50 + 1 NL block before the last block of c4 (NLNet baseline of GCNet)",
)

# CIFAR ResNets (He et al. 2016, option-A shortcuts).
for _builder in (
    cifar_resnet.cifar_resnet20,
    cifar_resnet.cifar_resnet32,
    cifar_resnet.cifar_resnet44,
    cifar_resnet.cifar_resnet56,
    cifar_resnet.cifar_resnet110,
):
    register_model(_builder.__name__, _builder)

# Video nets of the NL paper (layout "8x8" by default; layout="paper" for 32-frame clips).
for _builder in (
    video_resnet.c2d_resnet50,
    video_resnet.c2d_resnet101,
    video_resnet.i3d_resnet50,
    video_resnet.i3d_resnet101,
    video_resnet.slowonly_resnet50,
    video_resnet.slowonly_resnet101,
):
    register_model(_builder.__name__, _builder)
for _name, _builder in (
    ("c2d_resnet50", video_resnet.c2d_resnet50),
    ("i3d_resnet50", video_resnet.i3d_resnet50),
):
    for _count, _indices in ((1, NL1_RESNET50), (5, NL5_RESNET50), (10, NL10_RESNET50)):
        register_model(
            f"{_name}_nl{_count}",
            _builder,
            {"nonlocal_indices": _indices, "nonlocal_options": NL_VIDEO},
            f"{_name} + {_count} non-local block{'s' if _count > 1 else ''} in res3/res4 (NL paper)",
        )
    register_model(
        f"{_name}_gc",
        _builder,
        {"context": "gc", "reduction": 16, "stages": C3_C5},
        f"{_name} + GC r16 in every residual block of res3-res5 (a gcnet combination, not a paper row)",
    )

# GCNet's Kinetics models: the Slow-only baseline with GC, NL or SNL blocks.
for _name, _builder, _depth in (
    ("slowonly_resnet50", video_resnet.slowonly_resnet50, 50),
    ("slowonly_resnet101", video_resnet.slowonly_resnet101, 101),
):
    register_model(
        f"{_name}_gc",
        _builder,
        {"context": "gc", "reduction": 16, "stages": C3_C5},
        f"Slow-only ResNet-{_depth} + GC r16 in every residual block of res3-res5 (GCNet, Kinetics)",
    )
register_model(
    "slowonly_resnet50_nl5",
    video_resnet.slowonly_resnet50,
    {"nonlocal_indices": NL5_RESNET50, "nonlocal_options": NL_VIDEO},
    "Slow-only ResNet-50 + 5 non-local blocks in res3/res4 (GCNet's NL comparison on Kinetics)",
)
register_model(
    "slowonly_resnet50_snl5",
    video_resnet.slowonly_resnet50,
    {"nonlocal_indices": NL5_RESNET50, "nonlocal_block": "snl"},
    "Slow-only ResNet-50 + 5 simplified NL blocks at the NL places (GCNet's SNL comparison on Kinetics)",
)
