"""Checkpoint interop: torchvision, official GCNet / mmdetection and timm layouts; files; key reports."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from gcnet.models import (
    convert_state_dict,
    create_model,
    load_pretrained,
    load_state_dict_file,
    save_state_dict_file,
)
from gcnet.models.convert import timm_block_options
from tests.models.helpers import randomize_

GC_STAGES = {2: (512, 4), 3: (1024, 6), 4: (2048, 3)}  # layerN: (C, blocks) of c3-c5 in ResNet-50


@pytest.fixture(scope="module")
def torchvision_resnet50() -> nn.Module:
    """torchvision's ResNet-50, random init with random BN statistics, float64, eval."""
    torch.manual_seed(0)
    return randomize_(torchvision.models.resnet50()).double().eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def test_torchvision_resnet50_loads_strictly_and_gives_the_same_logits(torchvision_resnet50, images) -> None:
    model = create_model("resnet50").double().eval()
    report = load_pretrained(model, torchvision_resnet50.state_dict(), "torchvision", strict=True)
    assert report.exact
    with torch.no_grad():
        torch.testing.assert_close(model(images), torchvision_resnet50(images), rtol=1e-10, atol=1e-10)


def test_torchvision_into_gc_model_only_block_keys_are_new(torchvision_resnet50, images) -> None:
    """Into resnet50_gc_r16 the only missing keys are the GC blocks'; as they start as identity,
    the logits equal torchvision's."""
    model = create_model("resnet50_gc_r16").double().eval()
    with pytest.raises(ValueError, match=r"missing: layer2\.0\.context\.key\.weight"):
        load_pretrained(model, torchvision_resnet50.state_dict(), "torchvision", strict=True)
    report = load_pretrained(model, torchvision_resnet50.state_dict(), "torchvision", strict=False)
    assert report.unexpected == () and report.mismatched == ()
    assert report.missing and all(".context." in k for k in report.missing)
    assert len(report.missing) == 13 * 8  # 13 blocks x (key w, b + 2 Linear w, b + LayerNorm w, b)
    with torch.no_grad():
        torch.testing.assert_close(model(images), torchvision_resnet50(images), rtol=1e-10, atol=1e-10)


def test_load_report_names_unexpected_and_mismatched_keys(torchvision_resnet50) -> None:
    state = dict(torchvision_resnet50.state_dict(), **{"head.extra.weight": torch.zeros(1)})
    model = create_model("resnet50", num_classes=10).double()
    report = load_pretrained(model, state, "torchvision", strict=False)
    assert report.unexpected == ("head.extra.weight",)
    assert [m.split(" ")[0] for m in report.mismatched] == ["fc.weight", "fc.bias"]
    assert "fc.weight (checkpoint (1000, 2048), model (10, 2048))" in str(report)
    torch.testing.assert_close(model.conv1.weight, torchvision_resnet50.conv1.weight)  # the rest loaded


# --- official GCNet / mmdetection layout -------------------------------------------------------


def mmdet_gc_params(
    C: int, r: int, generator: torch.Generator, fusions: tuple[str, ...] = ("channel_add_conv",)
) -> dict[str, Tensor]:
    """Random parameters of an mmcv ContextBlock, named and shaped as in its state dict."""

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale

    Cr = C // r
    params = {"conv_mask.weight": rand(1, C, 1, 1, scale=C**-0.5), "conv_mask.bias": rand(1)}
    for fusion in fusions:
        params |= {
            f"{fusion}.0.weight": rand(Cr, C, 1, 1, scale=C**-0.5),
            f"{fusion}.0.bias": rand(Cr, scale=0.1),
            f"{fusion}.1.weight": 1 + rand(Cr, 1, 1, scale=0.1),  # LayerNorm([C/r, 1, 1])
            f"{fusion}.1.bias": rand(Cr, 1, 1, scale=0.1),
            f"{fusion}.3.weight": rand(C, Cr, 1, 1, scale=Cr**-0.5),
            f"{fusion}.3.bias": rand(C, scale=0.1),
        }
    return params


def mmdet_context_block(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """mmcv's ContextBlock as documented (pooling 'att'): conv_mask 1x1 -> softmax over H*W ->
    context = sum_j w_j x_j -> channel_{mul,add}_conv [1x1, LayerNorm([C/r, 1, 1]), ReLU, 1x1] ->
    out = x * sigmoid(mul) + add."""
    B, C, H, W = x.shape
    mask = F.conv2d(x, p["conv_mask.weight"], p["conv_mask.bias"]).view(B, 1, H * W)
    mask = mask.softmax(dim=2).view(B, 1, H * W, 1)
    context = torch.matmul(x.view(B, 1, C, H * W), mask).view(B, C, 1, 1)

    def transform(name: str) -> Tensor:
        t = F.conv2d(context, p[f"{name}.0.weight"], p[f"{name}.0.bias"])
        t = F.layer_norm(t, t.shape[1:], p[f"{name}.1.weight"], p[f"{name}.1.bias"])
        return F.conv2d(F.relu(t), p[f"{name}.3.weight"], p[f"{name}.3.bias"])

    out = x
    if "channel_mul_conv.0.weight" in p:
        out = out * torch.sigmoid(transform("channel_mul_conv"))
    if "channel_add_conv.0.weight" in p:
        out = out + transform("channel_add_conv")
    return out


def mmdet_resnet50_gc(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """c5 of mmdet's ResNet-50 (style 'pytorch': stride on the 3x3) with GC after conv3/bn3 of
    c3-c5, computed from the checkpoint's tensors by name."""

    def bn(t: Tensor, name: str) -> Tensor:
        return F.batch_norm(
            t,
            sd[f"{name}.running_mean"],
            sd[f"{name}.running_var"],
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            False,
            0.0,
            1e-5,
        )

    x = F.max_pool2d(
        F.relu(bn(F.conv2d(x, sd["backbone.conv1.weight"], stride=2, padding=3), "backbone.bn1")), 3, 2, 1
    )
    for layer, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):
        for i in range(blocks):
            p = f"backbone.layer{layer}.{i}."
            stride = 2 if layer > 1 and i == 0 else 1
            out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1), p + "bn2"))
            out = bn(F.conv2d(out, sd[p + "conv3.weight"]), p + "bn3")
            gc = {
                k[len(p + "context_block.") :]: v for k, v in sd.items() if k.startswith(p + "context_block.")
            }
            if gc:
                out = mmdet_context_block(out, gc)
            identity = x
            if p + "downsample.0.weight" in sd:
                identity = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
            x = F.relu(out + identity)
    return x


@pytest.fixture(scope="module")
def mmdet_checkpoint() -> dict:
    """A GC-ResNet-50 r16 detector checkpoint in the official GCNet/mmdetection layout, random values."""
    generator = torch.Generator().manual_seed(1)
    backbone = randomize_(create_model("resnet50", num_classes=0).double(), seed=1)
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}  # mmdet ResNet names = torchvision's
    for layer, (C, blocks) in GC_STAGES.items():
        for i in range(blocks):
            for k, v in mmdet_gc_params(C, 16, generator).items():
                sd[f"backbone.layer{layer}.{i}.context_block.{k}"] = v
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 512, 1, 1)  # not the backbone's: dropped
    return {"state_dict": sd}


def test_mmdet_gc_resnet50_converts_loads_strictly_and_computes_the_layout(mmdet_checkpoint) -> None:
    model = create_model("resnet50_gc_r16", num_classes=0).double().eval()
    assert load_pretrained(model, mmdet_checkpoint, "mmdet", strict=True).exact
    converted = convert_state_dict(mmdet_checkpoint, "mmdet")
    assert converted["layer3.5.context.key.weight"].shape == (1, 1024)
    assert converted["layer3.5.context.add_transform.1.weight"].shape == (64,)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = mmdet_resnet50_gc(mmdet_checkpoint["state_dict"], x)
        torch.testing.assert_close(model.feature_maps(x)["c5"], expected, rtol=1e-10, atol=1e-10)


def test_mmdet_layout_without_prefix_and_with_mul_fusion() -> None:
    """Keys without `backbone.`, `channel_mul_conv` and numbered plugin names (context_block1)."""
    generator = torch.Generator().manual_seed(2)
    model = (
        create_model("resnet18", num_classes=0, context="gc", reduction=4, context_options={"fusion": "both"})
        .double()
        .eval()
    )
    sd = {k: v for k, v in randomize_(model, seed=2).state_dict().items() if ".context." not in k}
    blocks = {}
    for name, module in model.named_modules():
        if name.endswith(".context"):
            block = name[: -len(".context")]
            blocks[block] = mmdet_gc_params(
                module.channels, 4, generator, ("channel_add_conv", "channel_mul_conv")
            )
            sd |= {f"{block}.context_block1.{k}": v for k, v in blocks[block].items()}
    assert load_pretrained(model, sd, "mmdet", strict=True).exact
    with torch.no_grad():
        for block, params in blocks.items():
            C = params["conv_mask.weight"].shape[1]
            x = torch.randn(2, C, 5, 4, dtype=torch.float64, generator=generator)
            torch.testing.assert_close(model.get_submodule(block).context(x), mmdet_context_block(x, params))


# --- timm -------------------------------------------------------------------------------------
# timm's ResNet (timm/models/resnet.py) puts its attention module in every residual block's `se`
# slot, after the last conv + BN (gcnet's "before_add"): "gc" (GlobalContext, scale fusion), "gca"
# (add fusion), both with rd_ratio 1/8, widths round(C / 8), LayerNorm2d eps 1e-6; "se" (SEModule,
# rd_ratio 1/16, widths rounded to a multiple of 8: 8 for C = 64 where C // 16 = 4).


def timm_resnet(name: str, attn_layer: object = None, seed: int = 5) -> nn.Module:
    """A timm ResNet with random weights and BN statistics (no download), float64, eval."""
    timm = pytest.importorskip("timm")
    block_args = {} if attn_layer is None else {"block_args": {"attn_layer": attn_layer}}
    return randomize_(timm.create_model(name, pretrained=False, **block_args), seed=seed).double().eval()


def timm_gc(**options: object) -> object:
    from timm.layers import GlobalContext as TimmGlobalContext

    return functools.partial(TimmGlobalContext, **options)


@pytest.fixture(scope="module")
def gca_resnet50() -> nn.Module:
    return timm_resnet("resnet50", "gca")


GC = {"pooling": "attention", "norm_eps": 1e-6}
TIMM_MODELS = [
    pytest.param("resnet50", "resnet50", "gca", "gc", 8, {**GC, "fusion": "add"}, id="gca-resnet50"),
    pytest.param("resnet50", "resnet50", "gc", "gc", 8, {**GC, "fusion": "scale"}, id="gc-resnet50"),
    pytest.param(
        "resnet18",
        "resnet18",
        lambda: timm_gc(fuse_add=True, fuse_scale=True, rd_ratio=1 / 4),
        "gc",
        4,
        {**GC, "fusion": "both"},
        id="gc-both-r4-resnet18",
    ),
    pytest.param(
        "resnet18",
        "resnet18",
        lambda: timm_gc(use_attn=False, fuse_add=True, fuse_scale=False),
        "gc",
        8,
        {**GC, "pooling": "average", "fusion": "add"},
        id="avg-add-resnet18",
    ),
    pytest.param("seresnet50", "resnet50", None, "se", 16, {}, id="seresnet50"),
    pytest.param("seresnext50_32x4d", "resnext50_32x4d", None, "se", 16, {}, id="seresnext50_32x4d"),
]


@pytest.mark.parametrize("timm_name,name,attn_layer,block,reduction,options", TIMM_MODELS)
def test_timm_resnets_load_strictly_and_give_timm_outputs(
    timm_name: str, name: str, attn_layer, block: str, reduction: int, options: dict
) -> None:
    """Where timm's widths are C // r, the options are a plain config-expressible block; the logits
    equal timm's to float64 rounding."""
    theirs = timm_resnet(timm_name, attn_layer() if callable(attn_layer) else attn_layer)
    found = timm_block_options(theirs.state_dict())
    stages = (True,) * 4
    assert found == {"context": block, "reduction": reduction, "context_options": options, "stages": stages}
    model = create_model(name, **found).double().eval()
    assert load_pretrained(model, theirs.state_dict(), "timm", strict=True).exact
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = theirs(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_timm_layer_norm_eps_decides_whether_outputs_match(gca_resnet50) -> None:
    """timm's LayerNorm2d eps is 1e-6: built with gcnet's 1e-5 every key fits, yet the logits
    differ (1.3e-5 at most here, float64); a strict load now refuses that, and norm_eps=1e-6
    computes timm's logits to 1e-10."""
    sd = gca_resnet50.state_dict()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = gca_resnet50(x)
    default_eps = create_model("resnet50", context="gc", reduction=8, stages=(True,) * 4).double().eval()
    clash = r"layer1\.0\.context\.add_transform\.1 \(LayerNorm eps: checkpoint 1e-06 \(timm\), model 1e-05\)"
    with pytest.raises(ValueError, match=clash + ".*timm_block_options"):
        load_pretrained(default_eps, sd, "timm", strict=True)
    report = load_pretrained(default_eps, sd, "timm", strict=False)
    assert not report.exact and report.missing == () and report.unexpected == ()
    assert len(report.mismatched) == 16 and all("LayerNorm eps" in m for m in report.mismatched)
    timm_eps = create_model("resnet50", **timm_block_options(sd)).double().eval()
    assert load_pretrained(timm_eps, sd, "timm", strict=True).exact
    with torch.no_grad():
        assert (default_eps(x) - expected).abs().max() > 1e-6
        torch.testing.assert_close(timm_eps(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "timm_name,attn_layer,gcnet_block,widths,reduced",
    [
        pytest.param("seresnet18", None, "se", (8, 8, 16, 32), (4, 8, 16, 32), id="seresnet18"),
        pytest.param(
            "resnet18",
            lambda: timm_gc(fuse_add=True, fuse_scale=False, rd_ratio=1 / 3),
            "gc",
            (21, 43, 85, 171),
            (21, 42, 85, 170),
            id="gc-r3-resnet18",
        ),
    ],
)
def test_timm_rounded_widths_load_through_per_channel_blocks(
    timm_name: str, attn_layer, gcnet_block: str, widths: tuple, reduced: tuple
) -> None:
    """timm rounds C * rd_ratio (SE to multiples of 8, GC to the nearest integer); no single r gives
    C // r for every stage, so the options hold a constructor giving each C its checkpoint width."""
    theirs = timm_resnet(timm_name, attn_layer() if callable(attn_layer) else attn_layer)
    sd = theirs.state_dict()
    r = 16 if gcnet_block == "se" else 3
    plain = create_model("resnet18", context=gcnet_block, reduction=r, stages=(True,) * 4).double()
    assert [plain.get_submodule(f"layer{i}.0.context").channels // r for i in range(1, 5)] == list(reduced)
    with pytest.raises(ValueError, match=r"mismatched: .*timm_block_options"):
        load_pretrained(plain, sd, "timm", strict=True)
    found = timm_block_options(sd)
    assert callable(found["context"]) and found["stages"] == (True,) * 4
    model = create_model("resnet18", **found).double().eval()
    assert [model.get_submodule(f"layer{i}.0.context").hidden_channels for i in range(1, 5)] == list(widths)
    assert load_pretrained(model, sd, "timm", strict=True).exact
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_timm_seresnet50_converts_and_matches() -> None:
    timm = pytest.importorskip("timm")
    theirs = randomize_(timm.create_model("seresnet50"), seed=6).double().eval()
    model = create_model("resnet50_se").double().eval()
    assert load_pretrained(model, theirs.state_dict(), "timm", strict=True).exact
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_timm_block_options_refuses_what_gcnet_cannot_build() -> None:
    with pytest.raises(ValueError, match=r"no timm attention blocks \(layerN\.i\.se\.\*\)"):
        timm_block_options(timm_resnet("resnet18").state_dict())
    with pytest.raises(ValueError, match=r"timm ByobNet \(stages\.N\.M\.\*, e\.g\. gcresnet50t"):
        timm_block_options(timm_resnet("gcresnext26ts").state_dict())
    eca = timm_resnet("resnet18", "eca").state_dict()  # ECA: a 1D conv over channels, not a GC instance
    with pytest.raises(ValueError, match=r"layer1\.0\.se holds \['conv\.weight'\]; expected timm's Global"):
        timm_block_options(eca)
    sd = {k: v for k, v in timm_resnet("seresnet18").state_dict().items() if not k.startswith("layer2.1.se.")}
    with pytest.raises(ValueError, match=r"layer2 has attention in \['layer2\.0'\] but not in \['layer2\.1"):
        timm_block_options(sd)


def test_timm_stages_without_blocks_are_off() -> None:
    """Blocks in c3-c5 only (timm's `se` slot left empty in layer1) give stages (False, True, True, True)."""
    theirs = timm_resnet("resnet50", "gca")
    sd = {k: v for k, v in theirs.state_dict().items() if not k.startswith("layer1.") or ".se." not in k}
    found = timm_block_options(sd)
    assert found["stages"] == (False, True, True, True)
    assert load_pretrained(create_model("resnet50", **found).double(), sd, "timm", strict=True).exact


# --- files ------------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path) -> None:
    model = randomize_(create_model("cifar_resnet20", context="gc"))
    path = save_state_dict_file(model, tmp_path / "model.safetensors")
    loaded = load_state_dict_file(path)
    assert loaded.keys() == model.state_dict().keys()
    fresh = create_model("cifar_resnet20", context="gc")
    assert load_pretrained(fresh, path, "torchvision").exact
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    with pytest.raises(ValueError, match="safetensors"):
        save_state_dict_file(model, tmp_path / "model.pt")


def test_torch_files_load_with_weights_only(tmp_path) -> None:
    """Wrapped checkpoints ({"state_dict": ...}, DDP's "module." prefix) load; pickled code does not."""
    model = create_model("cifar_resnet20")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
        tmp_path / "ddp.pth",
    )
    assert load_pretrained(create_model("cifar_resnet20"), tmp_path / "ddp.pth").exact
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": functools.partial(print, "side effect")}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_file(tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.safetensors")


def test_unknown_source_raises() -> None:
    with pytest.raises(ValueError, match="torchvision"):
        convert_state_dict({}, "detectron2")
