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


def test_timm_global_context_resnet_converts_and_matches() -> None:
    """timm's GlobalContext (conv_attn, mlp_add / mlp_scale = fc1, norm, fc2) in every block.

    timm's LayerNorm2d uses eps 1e-6, gcnet's LayerNorm 1e-5 (as mmdet); with the eps set equal,
    the converted model computes timm's logits to 1e-10."""
    timm = pytest.importorskip("timm")
    from timm.layers import GlobalContext as TimmGlobalContext

    attn = functools.partial(TimmGlobalContext, fuse_add=True, fuse_scale=True, rd_ratio=1 / 4)
    theirs = (
        randomize_(timm.create_model("resnet18", block_args={"attn_layer": attn}), seed=5).double().eval()
    )
    model = (
        create_model(
            "resnet18",
            context="gc",
            reduction=4,
            context_options={"fusion": "both"},
            stages=(True, True, True, True),
        )
        .double()
        .eval()
    )
    assert load_pretrained(model, theirs.state_dict(), "timm", strict=True).exact
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
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
