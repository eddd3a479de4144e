"""Video checkpoints: the NL paper's Caffe2 pickles and mmaction2's non-local I3D, checked against
files written here by independent writers and against reference graphs written from the sources."""

from __future__ import annotations

import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gcnet.models import create_model, load_for_finetuning, load_pretrained
from gcnet.models.video_checkpoints import caffe2_to_gcnet, mmaction2_to_gcnet, read_caffe2_pickle
from gcnet.models.video_resnet import VideoResNet, build_video_resnet
from gcnet.models.zoo import NL5_RESNET50
from tests.models.helpers import randomize_

EPS = 1e-5
NL_MMCV = {"scale": "none", "subsample": True, "subsample_at": "projections"}
NL_CAFFE2 = {"scale": "inner", "subsample": True, "subsample_at": "input"}
NL_AFTER_RES4_0 = ((), (), (0,), ())
BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def clip(frames: int, batch: int = 1, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, 32, 32, dtype=torch.float64, generator=generator)


def fresh(build: Callable[[], VideoResNet]) -> VideoResNet:
    """A second, differently initialised copy of an architecture, to load into."""
    torch.manual_seed(123)
    return build().double().eval()


# --- writing files as their sources do ------------------------------------------------------------


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes what Python 2's cPickle wrote: str and bytes as py2 byte strings, numpy.core names."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def write_py2_pickle(content: object, path: Path) -> Path:
    with path.open("wb") as f:
        Py2Pickler(f, protocol=2).dump(content)
    return path


def caffe2_blobs(model: VideoResNet, *, affine: bool = False, seed: int = 5) -> dict[str, np.ndarray]:
    """The blobs video-nonlocal-net saves for `model`'s weights, named as resnet_helper.py,
    nonlocal_helper.py and resnet_video*.py name them.

    NL out convs get a random bias b (their BN's running mean grows by b, so the block computes the
    same). `affine` folds every BN into _bn_s / _bn_b as convert_to_finetune.py does.
    """
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    blobs: dict[str, np.ndarray] = {}

    def bn(gc: str, c2: str, shift: np.ndarray | float = 0.0) -> None:
        s, b = sd[f"{gc}.weight"], sd[f"{gc}.bias"]
        rm, riv = sd[f"{gc}.running_mean"] + shift, sd[f"{gc}.running_var"]
        if affine:
            blobs[f"{c2}_s"] = s / np.sqrt(riv + EPS)
            blobs[f"{c2}_b"] = b - rm * s / np.sqrt(riv + EPS)
        else:
            blobs.update({f"{c2}_s": s, f"{c2}_b": b, f"{c2}_rm": rm, f"{c2}_riv": riv})

    def conv1x1(weight: np.ndarray) -> np.ndarray:
        return weight[:, :, None, None, None]

    blobs["conv1_w"] = sd["conv1.weight"]
    bn("bn1", "res_conv1_bn")
    for n, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=2):
        for i in range(len(stage)):
            gc, c2 = f"layer{n - 1}.{i}", f"res{n}_{i}"
            for k, branch in ((1, "branch2a"), (2, "branch2b"), (3, "branch2c")):
                blobs[f"{c2}_{branch}_w"] = sd[f"{gc}.conv{k}.weight"]
                bn(f"{gc}.bn{k}", f"{c2}_{branch}_bn")
            if f"{gc}.downsample.0.weight" in sd:
                blobs[f"{c2}_branch1_w"] = sd[f"{gc}.downsample.0.weight"]
                bn(f"{gc}.downsample.1", f"{c2}_branch1_bn")
        for i, block in stage.nonlocal_blocks.items():
            gc, c2 = f"layer{n - 1}.nonlocal_blocks.{i}", f"nonlocal_conv{n}_{i}"
            for part in ("theta", "phi", "g"):
                blobs[f"{c2}_{part}_w"] = conv1x1(sd[f"{gc}.{part}.weight"])
                blobs[f"{c2}_{part}_b"] = sd[f"{gc}.{part}.bias"]
            blobs[f"{c2}_out_w"] = conv1x1(sd[f"{gc}.w_z.weight"])
            if block.bn is None:
                blobs[f"{c2}_out_b"] = sd[f"{gc}.w_z.bias"]
            else:
                blobs[f"{c2}_out_b"] = rng.normal(size=block.channels) * 0.3
                bn(f"{gc}.bn", f"{c2}_bn", shift=blobs[f"{c2}_out_b"])
    blobs["pred_w"], blobs["pred_b"] = sd["fc.weight"], sd["fc.bias"]
    return blobs


def with_training_state(blobs: dict[str, np.ndarray]) -> dict[str, object]:
    """What save_model_params writes besides the parameters: model_iter, lr and momentum blobs."""
    noisy: dict[str, object] = dict(blobs, model_iter=400000, lr=np.array(1e-4, dtype=np.float32))
    for name in ("conv1_w", "res2_0_branch2a_w", "pred_w"):
        noisy[f"{name}_momentum"] = np.zeros_like(blobs[name])
    return {"blobs": noisy}


def mmaction2_state(model: VideoResNet) -> dict[str, Tensor]:
    """The state dict mmaction2's Recognizer3D (ResNet3d with mmcv NonLocal3d, I3DHead) saves for
    `model`'s weights: ConvModule `.conv` / `.bn`, the NL block inside residual block M."""
    sd = model.state_dict()
    out: dict[str, Tensor] = {}

    def conv_bn(conv: str, bn: str, mm: str) -> None:
        out[f"backbone.{mm}.conv.weight"] = sd[f"{conv}.weight"]
        out.update({f"backbone.{mm}.bn.{p}": sd[f"{bn}.{p}"] for p in BN_PARAMS})

    conv_bn("conv1", "bn1", "conv1")
    for n, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
        for i in range(len(stage)):
            for k in (1, 2, 3):
                conv_bn(f"layer{n}.{i}.conv{k}", f"layer{n}.{i}.bn{k}", f"layer{n}.{i}.conv{k}")
            block = f"layer{n}.{i}"
            if f"{block}.downsample.0.weight" in sd:
                conv_bn(f"{block}.downsample.0", f"{block}.downsample.1", f"{block}.downsample")
        for i, block in stage.nonlocal_blocks.items():
            gc, mm = f"layer{n}.nonlocal_blocks.{i}", f"backbone.layer{n}.{i}.non_local_block"
            parts = {"g": "g.0" if block.subsample else "g"}
            if block.mode != "gaussian":
                parts.update(theta="theta", phi="phi.0" if block.subsample else "phi")
            for part, module in parts.items():
                out[f"{mm}.{module}.conv.weight"] = sd[f"{gc}.{part}.weight"][:, :, None, None, None]
                out[f"{mm}.{module}.conv.bias"] = sd[f"{gc}.{part}.bias"]
            out[f"{mm}.conv_out.conv.weight"] = sd[f"{gc}.w_z.weight"][:, :, None, None, None]
            out.update({f"{mm}.conv_out.bn.{p}": sd[f"{gc}.bn.{p}"] for p in BN_PARAMS})
    out["cls_head.fc_cls.weight"], out["cls_head.fc_cls.bias"] = sd["fc.weight"], sd["fc.bias"]
    return {k: v.clone() for k, v in out.items()}


# --- reference graphs, written from the sources ---------------------------------------------------


def caffe2_reference(blobs: dict[str, np.ndarray], x: Tensor, layout: str) -> Tensor:
    """The released graph run from the blobs: resnet_video_org.py ("paper") or resnet_video.py
    ("8x8"), resnet_helper.py's bottleneck, nonlocal_helper.py's spacetime_nonlocal (eval)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in blobs.items()}

    def conv(x: Tensor, name: str, stride: tuple[int, int, int] = (1, 1, 1)) -> Tensor:
        w = t[f"{name}_w"]
        return F.conv3d(x, w, t.get(f"{name}_b"), stride, [k // 2 for k in w.shape[2:]])

    def bn(x: Tensor, name: str) -> Tensor:
        view = (1, -1, 1, 1, 1)
        s, b = t[f"{name}_s"].view(view), t[f"{name}_b"].view(view)
        if f"{name}_rm" not in t:  # AffineNd
            return x * s + b
        return (x - t[f"{name}_rm"].view(view)) / torch.sqrt(t[f"{name}_riv"].view(view) + EPS) * s + b

    def nonlocal_(x: Tensor, p: str) -> Tensor:
        B = x.shape[0]
        theta = conv(x, f"{p}_theta")
        pooled = F.max_pool3d(x, (1, 2, 2), (1, 2, 2))
        phi, g = conv(pooled, f"{p}_phi"), conv(pooled, f"{p}_g")
        inner = theta.shape[1]
        affinity = torch.bmm(theta.reshape(B, inner, -1).transpose(1, 2), phi.reshape(B, inner, -1))
        prob = (affinity * inner**-0.5).softmax(dim=2)  # (B, N, Nk)
        y = torch.bmm(g.reshape(B, inner, -1), prob.transpose(1, 2)).reshape(theta.shape)
        out = conv(y, f"{p}_out")
        return x + (bn(out, f"{p}_bn") if f"{p}_bn_s" in t else out)

    paper = layout == "paper"
    x = F.relu(bn(conv(x, "conv1", (2, 2, 2) if paper else (1, 2, 2)), "res_conv1_bn"))
    x = F.max_pool3d(x, (2, 3, 3) if paper else (1, 3, 3), (2, 2, 2) if paper else (1, 2, 2), 0)
    for stage in (2, 3, 4, 5):
        i = 0
        while f"res{stage}_{i}_branch2a_w" in t:
            p, s = f"res{stage}_{i}", 2 if stage > 2 and i == 0 else 1
            out = F.relu(bn(conv(x, f"{p}_branch2a"), f"{p}_branch2a_bn"))
            out = F.relu(bn(conv(out, f"{p}_branch2b", (1, s, s)), f"{p}_branch2b_bn"))
            out = bn(conv(out, f"{p}_branch2c"), f"{p}_branch2c_bn")
            short = bn(conv(x, f"{p}_branch1", (1, s, s)), f"{p}_branch1_bn") if f"{p}_branch1_w" in t else x
            x = F.relu(out + short)
            if f"nonlocal_conv{stage}_{i}_theta_w" in t:
                x = nonlocal_(x, f"nonlocal_conv{stage}_{i}")
            i += 1
        if stage == 2:
            x = F.max_pool3d(x, (2, 1, 1), (2, 1, 1))
    pred_w = t["pred_w"].reshape(t["pred_w"].shape[0], -1)
    return x.mean(dim=(2, 3, 4)) @ pred_w.T + t["pred_b"]


def mmcv_nonlocal(x: Tensor, sd: dict[str, Tensor], name: str, mode: str) -> Tensor:
    """mmcv's _NonLocalNd.forward for NonLocal3d(sub_sample=True, use_scale=False), BN3d after conv_out."""
    n, C = x.shape[:2]

    def conv_module(x: Tensor, module: str) -> Tensor:
        return F.conv3d(x, sd[f"{name}.{module}.conv.weight"], sd.get(f"{name}.{module}.conv.bias"))

    def pool(x: Tensor) -> Tensor:
        return F.max_pool3d(x, (1, 2, 2))

    g_x = pool(conv_module(x, "g.0"))
    inner = g_x.shape[1]
    g_x = g_x.view(n, inner, -1).permute(0, 2, 1)
    if mode == "gaussian":
        theta_x, phi_x = x.view(n, C, -1).permute(0, 2, 1), pool(x).view(n, C, -1)
    else:
        theta_x = conv_module(x, "theta").view(n, inner, -1).permute(0, 2, 1)
        phi_x = pool(conv_module(x, "phi.0")).view(n, inner, -1)
    pairwise = torch.matmul(theta_x, phi_x)
    pairwise = pairwise / pairwise.shape[-1] if mode == "dot_product" else pairwise.softmax(dim=-1)
    y = torch.matmul(pairwise, g_x).permute(0, 2, 1).reshape(n, inner, *x.shape[2:])
    out = F.conv3d(y, sd[f"{name}.conv_out.conv.weight"])
    bn = {p: sd[f"{name}.conv_out.bn.{p}"] for p in ("weight", "bias", "running_mean", "running_var")}
    bn = {p: v.view(1, -1, 1, 1, 1) for p, v in bn.items()}
    out = (out - bn["running_mean"]) / torch.sqrt(bn["running_var"] + EPS) * bn["weight"] + bn["bias"]
    return x + out


# --- Caffe2: the full I3D ResNet-50 NL5 of the paper -----------------------------------------------


def i3d_nl5_paper() -> VideoResNet:
    return create_model("i3d_resnet50_nl5", num_classes=7, stem_pool_padding=0, layout="paper")


@pytest.fixture(scope="module")
def caffe2_i3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[VideoResNet, dict[str, np.ndarray], Path]:
    """A randomised i3d_resnet50_nl5 ("paper", pool1 unpadded), its blobs, and a py2 pickle of them."""
    model = randomize_(i3d_nl5_paper()).double().eval()
    blobs = caffe2_blobs(model)
    path = write_py2_pickle(with_training_state(blobs), tmp_path_factory.mktemp("caffe2") / "i3d_nl5.pkl")
    return model, blobs, path


@pytest.fixture(scope="module")
def caffe2_i3d_loaded(caffe2_i3d) -> VideoResNet:
    _, _, path = caffe2_i3d
    model = fresh(i3d_nl5_paper)
    state = caffe2_to_gcnet(read_caffe2_pickle(path), model)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    return model


def test_caffe2_pickle_loads_strictly_and_reproduces_the_model(caffe2_i3d, caffe2_i3d_loaded) -> None:
    """Every blob has a place and every key a blob; the NL out bias folded into its BN changes nothing."""
    original, blobs, path = caffe2_i3d
    read = read_caffe2_pickle(path)
    assert set(read) == set(blobs)  # model_iter, lr, *_momentum dropped
    x = clip(16)
    with torch.no_grad():
        torch.testing.assert_close(caffe2_i3d_loaded(x), original(x), rtol=1e-9, atol=1e-9)


def test_caffe2_reference_graph_matches_the_loaded_model(caffe2_i3d, caffe2_i3d_loaded) -> None:
    """The released graph (pool1 unpadded, riv a variance, NL on pooled x with 1/sqrt(C')) run from
    the blobs gives the loaded model's logits: the mapping, not only a round trip, is right."""
    _, blobs, _ = caffe2_i3d
    x = clip(16)
    with torch.no_grad():
        reference = caffe2_reference(blobs, x, "paper")
        torch.testing.assert_close(caffe2_i3d_loaded(x), reference, rtol=1e-9, atol=1e-9)


# --- Caffe2: a small net for the affine variant and the errors -------------------------------------


def small_c2d(
    nl_norm: bool = True, stem_pool_padding: int = 0, indices: Any = NL_AFTER_RES4_0
) -> VideoResNet:
    """C2D "8x8" with one block per stage and an NL block after res4_0: cheap, same names."""
    return build_video_resnet(
        (1, 1, 1, 1), kind="c2d", layout="8x8", num_classes=5, stem_pool_padding=stem_pool_padding,
        nonlocal_indices=indices, nonlocal_options={**NL_CAFFE2, "norm": nl_norm},
    )


@pytest.fixture(scope="module")
def small_blobs() -> tuple[VideoResNet, dict[str, np.ndarray]]:
    model = randomize_(small_c2d()).double().eval()
    return model, caffe2_blobs(model)


@pytest.mark.parametrize("nl_norm", [True, False], ids=["nl_bn_folded", "nl_without_bn"])
def test_caffe2_affine_variant_computes_x_times_s_plus_b(nl_norm: bool, tmp_path: Path) -> None:
    """Only _bn_s / _bn_b (modify_caffe2_ftvideo.py): each BN computes x * s + b and the net gives the
    reference graph's logits; an NL block without BN (the affine recipe) takes _out_b as W_z's bias.
    pred_w comes as the 'test' net's (K, C, 1, 1, 1) conv."""
    original = randomize_(small_c2d(nl_norm=nl_norm)).double().eval()
    blobs = caffe2_blobs(original, affine=True)
    assert not any(name.endswith(("_rm", "_riv")) for name in blobs)
    blobs["pred_w"] = blobs["pred_w"][:, :, None, None, None]
    # top level, with a float lr, as modify_caffe2_ftvideo.py writes
    path = write_py2_pickle(dict(blobs, lr=0.00125), tmp_path / "affine.pkl")
    model = fresh(lambda: small_c2d(nl_norm=nl_norm))
    model.load_state_dict(caffe2_to_gcnet(read_caffe2_pickle(path), model), strict=True)
    x = torch.randn(2, 64, 3, 5, 5, dtype=torch.float64)
    s, b = (torch.from_numpy(blobs[f"res_conv1_bn_{p}"]).view(1, -1, 1, 1, 1) for p in "sb")
    with torch.no_grad():
        torch.testing.assert_close(model.bn1(x), x * s + b, rtol=1e-12, atol=1e-12)
        video = clip(4, batch=2)
        logits = model(video)
        torch.testing.assert_close(logits, caffe2_reference(blobs, video, "8x8"), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits, original(video), rtol=1e-9, atol=1e-9)


def test_caffe2_affine_res3_nonlocal_is_refused_as_grouped(tmp_path: Path) -> None:
    """Affine models run res3 NL in groups of 4 frames (res_stage_nonlocal_group): refused by default."""
    original = randomize_(small_c2d(nl_norm=False, indices=((), (0,), (), ()))).double()
    blobs = caffe2_blobs(original, affine=True)
    model = small_c2d(nl_norm=False, indices=((), (0,), (), ()))
    with pytest.raises(ValueError, match=r"nonlocal_conv3_0.*groups of 4 frames"):
        caffe2_to_gcnet(blobs, model)
    model.load_state_dict(caffe2_to_gcnet(blobs, model, check_architecture=False), strict=True)


def _expect_load_error(blobs: dict[str, Any], match: str, model: VideoResNet | None = None) -> None:
    with pytest.raises(ValueError, match=match):
        caffe2_to_gcnet(blobs, model if model is not None else small_c2d())


def test_caffe2_missing_blob_is_named(small_blobs) -> None:
    _, blobs = small_blobs
    blobs = {k: v for k, v in blobs.items() if k != "res3_0_branch2b_bn_riv"}
    _expect_load_error(blobs, r"1 missing from the checkpoint: res3_0_branch2b_bn_riv$")


def test_caffe2_unknown_blob_is_named(small_blobs) -> None:
    _, blobs = small_blobs
    _expect_load_error(dict(blobs, res6_0_branch2a_w=np.zeros((1, 1, 1, 1, 1))),
                       r"1 unexpected in the checkpoint: res6_0_branch2a_w$")


def test_caffe2_shape_mismatch_names_blob_key_and_shapes(small_blobs) -> None:
    _, blobs = small_blobs
    wrong = dict(blobs, res4_0_branch2a_w=np.zeros((256, 512, 3, 1, 1)))
    _expect_load_error(wrong, r"res4_0_branch2a_w -> layer3\.0\.conv1\.weight "
                              r"\(checkpoint \(256, 512, 3, 1, 1\), model \(256, 512, 1, 1, 1\)\)")


def test_caffe2_model_parts_without_blobs_are_named(small_blobs) -> None:
    """A GC block in the model has no blob in the released code: its keys are reported."""
    _, blobs = small_blobs
    model = build_video_resnet((1, 1, 1, 1), kind="c2d", num_classes=5, stem_pool_padding=0, context="gc",
                               stages=(False, False, False, True), nonlocal_indices=NL_AFTER_RES4_0,
                               nonlocal_options=NL_CAFFE2)
    _expect_load_error(blobs, r"model keys no Caffe2 checkpoint has a place for: layer4\.0\.context\.", model)


def test_caffe2_padded_pool1_is_refused_unless_asked(small_blobs) -> None:
    _, blobs = small_blobs
    model = small_c2d(stem_pool_padding=1)
    _expect_load_error(blobs, r"pool1 pads \(1, 1\).*stem_pool_padding=0", model)
    model.load_state_dict(caffe2_to_gcnet(blobs, model, check_architecture=False), strict=True)


def test_caffe2_projection_pooling_nonlocal_is_refused(small_blobs) -> None:
    _, blobs = small_blobs
    model = build_video_resnet((1, 1, 1, 1), kind="c2d", num_classes=5, stem_pool_padding=0,
                               nonlocal_indices=NL_AFTER_RES4_0, nonlocal_options=NL_MMCV)
    _expect_load_error(blobs, r"layer3\.nonlocal_blocks\.0 pools phi\(x\) and g\(x\)", model)


def test_caffe2_2d_kernels_inflate_as_the_released_code_does(small_blobs) -> None:
    """ImageNet-style 2D kernels (O, I, k, k) fill an I3D: repeated over time and divided by T."""
    _, blobs = small_blobs
    flat = {k: v[:, :, 0] if v.ndim == 5 else v for k, v in blobs.items()}
    model = build_video_resnet((1, 1, 1, 1), kind="i3d", num_classes=5, stem_pool_padding=0,
                               nonlocal_indices=NL_AFTER_RES4_0, nonlocal_options=NL_CAFFE2)
    state = caffe2_to_gcnet(flat, model)
    for key, name, frames in (
        ("conv1.weight", "conv1_w", 5),
        ("layer1.0.conv1.weight", "res2_0_branch2a_w", 3),
    ):
        expected = torch.from_numpy(flat[name]).unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames
        torch.testing.assert_close(state[key], expected.float())
    model.load_state_dict(state, strict=True)


def test_read_caffe2_pickle_refuses_non_dict_and_non_array_content(tmp_path: Path) -> None:
    path = write_py2_pickle([np.zeros(3)], tmp_path / "list.pkl")
    expected = rf"{re.escape(str(path))}: expected a pickled dict of blobs.*got list"
    with pytest.raises(TypeError, match=expected):
        read_caffe2_pickle(path)
    path = write_py2_pickle({"blobs": {"conv1_w": "not an array"}}, tmp_path / "str.pkl")
    expected = rf"{re.escape(str(path))}: blob 'conv1_w' is a str; expected a numeric numpy array"
    with pytest.raises(TypeError, match=expected):
        read_caffe2_pickle(path)


class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def test_read_caffe2_pickle_refuses_other_globals_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = write_py2_pickle({"blobs": {"conv1_w": _RunsACommand(f"touch {marker}")}}, tmp_path / "evil.pkl")
    expected = rf"{re.escape(str(path))}: refusing to load global (posix|os)\.system"
    with pytest.raises(pickle.UnpicklingError, match=expected):
        read_caffe2_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["python2", "python3_protocol2", "python3_protocol5"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["under_blobs", "top_level"])
def test_read_caffe2_pickle_reads_python2_and_python3_pickles(
    writer: str, wrapped: bool, tmp_path: Path
) -> None:
    blobs = {"conv1_w": np.arange(12, dtype=np.float32).reshape(2, 1, 1, 2, 3), "pred_b": np.float32(0.5)}
    content = dict(blobs, model_iter=7, lr=np.array(0.1, dtype=np.float32), conv1_w_momentum=np.zeros(3))
    content = {"blobs": content} if wrapped else content
    path = tmp_path / "blobs.pkl"
    if writer == "python2":
        write_py2_pickle(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=2 if writer == "python3_protocol2" else 5))
    read = read_caffe2_pickle(path)
    assert sorted(read) == ["conv1_w", "pred_b"]
    np.testing.assert_array_equal(read["conv1_w"], blobs["conv1_w"])
    assert read["pred_b"].shape == () and read["pred_b"] == 0.5


def test_caffe2_to_gcnet_wants_a_video_resnet(small_blobs) -> None:
    _, blobs = small_blobs
    with pytest.raises(TypeError, match="expected a gcnet VideoResNet"):
        caffe2_to_gcnet(blobs, create_model("resnet50"))  # type: ignore[arg-type]


# --- mmaction2 -----------------------------------------------------------------------------------


def i3d_nl5_mmaction2() -> VideoResNet:
    return build_video_resnet((3, 4, 6, 3), kind="i3d", layout="mmaction2", num_classes=7,
                              nonlocal_indices=NL5_RESNET50, nonlocal_options=NL_MMCV)


def test_mmaction2_checkpoint_loads_strictly_and_reproduces_the_model(tmp_path: Path) -> None:
    original = randomize_(i3d_nl5_mmaction2()).double().eval()
    path = tmp_path / "i3d_nl.pth"
    meta = {"epoch": 100, "mmaction2_version": "1.2.0"}
    torch.save({"meta": meta, "state_dict": mmaction2_state(original)}, path)
    model = fresh(i3d_nl5_mmaction2)
    state = mmaction2_to_gcnet(torch.load(path, weights_only=True), model)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    x = clip(16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-9, atol=1e-9)


def small_i3d_mmaction2(mode: str = "embedded_gaussian", **nl: Any) -> VideoResNet:
    return build_video_resnet(
        (1, 1, 2, 1), kind="i3d", layout="mmaction2", num_classes=5, nonlocal_indices=((), (), (1,), ()),
        nonlocal_options={**NL_MMCV, "mode": mode, **nl},
    )


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "gaussian"])
def test_mmcv_nonlocal_formula_matches_gcnet_nonlocal_loaded_from_its_keys(mode: str) -> None:
    """mmcv's NonLocal3d (pool after phi / g, no scale, conv_out without bias + BN) written out from
    its source, fed from the mmaction2 keys, equals gcnet's NonLocal loaded by the reader."""
    original = randomize_(small_i3d_mmaction2(mode)).double()
    mm = mmaction2_state(original)
    model = fresh(lambda: small_i3d_mmaction2(mode))
    model.load_state_dict(mmaction2_to_gcnet(mm, model), strict=True)
    x = torch.randn(2, 1024, 2, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.layer3.nonlocal_blocks["1"](x),
            mmcv_nonlocal(x, mm, "backbone.layer3.1.non_local_block", mode),
            rtol=1e-10, atol=1e-10,
        )


def test_mmaction2_missing_and_unknown_keys_are_named() -> None:
    model = small_i3d_mmaction2()
    mm = mmaction2_state(randomize_(small_i3d_mmaction2()))
    del mm["backbone.layer3.1.non_local_block.phi.0.conv.bias"]
    mm["backbone.layer3.1.non_local_block.extra.weight"] = torch.zeros(1)
    block = r"backbone\.layer3\.1\.non_local_block"
    expected = (rf"1 missing from the checkpoint: {block}\.phi\.0\.conv\.bias; "
                rf"1 unexpected in the checkpoint: {block}\.extra\.weight$")
    with pytest.raises(ValueError, match=expected):
        mmaction2_to_gcnet(mm, model)


def test_mmaction2_other_stem_or_nonlocal_pooling_is_refused() -> None:
    mm = mmaction2_state(small_i3d_mmaction2())
    gcnet_stem = build_video_resnet((1, 1, 2, 1), kind="i3d", layout="paper", num_classes=5,
                                    nonlocal_indices=((), (), (1,), ()), nonlocal_options=NL_MMCV)
    expected = r"pool1 kernel is \(2, 3, 3\) where mmaction2's I3D has \(1, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        mmaction2_to_gcnet(mm, gcnet_stem)
    with pytest.raises(ValueError, match=r"layer3\.nonlocal_blocks\.1 pools x before phi and g"):
        mmaction2_to_gcnet(mm, small_i3d_mmaction2(subsample_at="input", scale="inner"))


# --- through gcnet's loaders: load_pretrained, load_for_finetuning, a config -------------------------


def test_caffe2_and_mmaction2_files_load_through_gcnets_loaders(small_blobs, tmp_path: Path) -> None:
    """`load_pretrained(..., "caffe2")` reads the .pkl safely and loads strictly; fine-tuning into
    another class count with GC blocks added keeps every released weight and starts the rest from init."""
    original, blobs = small_blobs
    path = write_py2_pickle(with_training_state(blobs), tmp_path / "c2d.pkl")
    model = fresh(small_c2d)
    assert load_pretrained(model, path, "caffe2").exact
    loaded = model.layer3.nonlocal_blocks["0"].theta.weight
    released = original.layer3.nonlocal_blocks["0"].theta.weight
    torch.testing.assert_close(loaded, released.to(loaded.dtype))
    tuned = build_video_resnet((1, 1, 1, 1), kind="c2d", num_classes=3, stem_pool_padding=0, context="gc",
                               nonlocal_indices=NL_AFTER_RES4_0, nonlocal_options=NL_CAFFE2)
    report = load_for_finetuning(tuned, path, "caffe2")
    assert all(".context." in k or k.startswith("fc.") for k in report.missing) and report.missing
    torch.testing.assert_close(tuned.layer2[0].conv2.weight, original.layer2[0].conv2.weight.float())
    assert tuned.fc.out_features == 3
    with pytest.raises(ValueError, match=r"unexpected: res9_0_branch2a_w"):
        extra = {**blobs, "res9_0_branch2a_w": np.zeros(3, np.float32)}
        load_for_finetuning(fresh(small_c2d), extra, "caffe2")
    mm = tmp_path / "i3d.pth"
    torch.save({"state_dict": mmaction2_state(randomize_(small_i3d_mmaction2()))}, mm)
    assert load_pretrained(small_i3d_mmaction2(), mm, "mmaction2").exact
