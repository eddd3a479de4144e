"""Video checkpoints of the Non-local paper (Caffe2 .pkl) and of mmaction2's non-local I3D (.pth).

Wang et al., "Non-local Neural Networks", arXiv:1711.07971; weights released with
facebookresearch/video-nonlocal-net (Caffe2 blobs, a Python-2 pickle) and open-mmlab/mmaction2
(`i3d_imagenet-pretrained-r50-nl-*` configs). Both readers walk a gcnet `VideoResNet` and take, for
each of its tensors, the source tensor named below; anything missing, left over or mis-shaped
raises one ValueError naming all of it (a strict load).

Names for residual block i of gcnet stage layerN and a non-local block after it (Caffe2 calls
the stage res{N+1}; mmaction2 keys start with `backbone.`, the head with `cls_head.`):

    gcnet                       Caffe2 blob                          mmaction2 key
    conv1, bn1                  conv1_w, res_conv1_bn_*              conv1.conv, conv1.bn
    layerN.i.conv1, bn1         res{N+1}_i_branch2a_w, _branch2a_bn_*  layerN.i.conv1.conv, .bn
      (conv2 / bn2, conv3 / bn3: branch2b, branch2c; conv2, conv3)
    layerN.0.downsample.0, .1   res{N+1}_0_branch1_w, _branch1_bn_*  layerN.0.downsample.conv, .bn
    layerN.nonlocal_blocks.i    nonlocal_conv{N+1}_i_*               layerN.i.non_local_block.*
      .theta, .phi, .g          _theta_{w,b}, _phi_*, _g_*           theta.conv, phi[.0].conv, g[.0].conv
      .w_z, .bn                 _out_{w,b}, _bn_*                    conv_out.conv, conv_out.bn
    fc                          pred_{w,b}                           cls_head.fc_cls

Caffe2 BN blobs are _s (gamma), _b (beta), _rm (running mean) and _riv (running *variance*, despite
the name). 1x1x1 conv kernels (O, I, 1, 1, 1) become Linear weights (O, I); 2D kernels (O, I, k, k)
are inflated to the model's temporal size (repeat, divide by T), as the released code does.

Caffe2 differences from a gcnet model, and what reading does:
    affine BN: files from modify_caffe2_ftvideo.py (and USE_AFFINE training) hold only _bn_s and
        _bn_b, already folded; they load as running mean 0 and running variance 1 - eps, so each
        BN computes x * s + b exactly.
    NL out conv bias: gcnet's W_z before BN has none, so _out_b is folded into the BN's running
        mean (BN(W y + b) with mean m is BN(W y) with mean m - b). A block without BN (the affine
        recipe's NONLOCAL.USE_BN False) loads into `nonlocal_options={"norm": False}`, W_z with bias.
    pool1 pads 0 spatially: the model needs `stem_pool_padding=0` (checked).
    NL pools x by 1x2x2 before phi and g (`subsample_at="input"`, checked) and scales by
        C'**-0.5 (`scale="inner"`, a config option of the released code: not checked).
    res3 NL of affine models runs in groups of 4 frames (res_stage_nonlocal_group); gcnet's NL
        attends over all frames, so such files are refused (checked): outputs agree only for
        clips with at most 4 frames at res3.
    layouts: resnet_video.py (the *_8x8_* and *_32x4_* files) is layout "8x8",
        resnet_video_org.py (*_32x2_*, *_128x1_*) is "paper"; their weights have the same shapes.
    BN eps is 1.0000001e-5 (gcnet 1e-5); inputs are RGB, (x / 255 - 0.45) / 0.225 (mean 114.75,
        std 57.375 on 0-255 pixels): no channel flip.

mmaction2 differences: the NL block sits inside residual block M after its last ReLU, which is
gcnet's block after residual block M; mmcv's NonLocal3d max-pools phi(x) and g(x)
(`subsample_at="projections"`, checked), has use_scale=False in the configs (`scale="none"`) and a
bias-free conv_out before BN, as gcnet's W_z. Stem: conv1 5x7x7 stride 2, 2, 2; pool1 1x3x3 stride
2, 2, 2 padding 0, 1, 1; pool2 2x1x1 (checked). Inputs are RGB with ImageNet mean (123.675, 116.28,
103.53) and std (58.395, 57.12, 57.375) on 0-255 pixels.

Pickles are read by an unpickler that builds numpy arrays and nothing else: no code runs.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from gcnet.blocks.non_local import NonLocal
from gcnet.models.convert import inflate_conv_weight, unwrap_state_dict
from gcnet.models.resnet import Bottleneck, ResNetStage
from gcnet.models.video_resnet import VideoResNet

try:  # numpy 2 (and 1.26); older numpy has numpy.core only
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

StateDict = dict[str, Tensor]
Blob = np.ndarray | Tensor
# Entries of a Caffe2 checkpoint that are training state, not parameters.
CAFFE2_TRAINING_STATE = ("model_iter", "lr", "epoch")
CAFFE2_MOMENTUM_SUFFIX = "_momentum"
MMACTION2_STEM = {"conv1 stride": (2, 2, 2), "pool1 kernel": (1, 3, 3), "pool1 stride": (2, 2, 2),
                  "pool1 padding": (0, 1, 1)}
_BOTTLENECK_CONVS = (("conv1", "bn1", "branch2a"), ("conv2", "bn2", "branch2b"), ("conv3", "bn3", "branch2c"))
_NAMES_SHOWN = 40
_RES3_NONLOCAL = re.compile(r"^nonlocal_conv3_\d+")


def _latin1_encode(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as Python 3 writes bytes into protocol-2 pickles; latin-1 only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}; expected 'latin1'")
    return text.encode("latin1")


# What numpy arrays need: py2 files name numpy.core, numpy 2 numpy._core; protocol 2 written by
# Python 3 wraps bytes in _codecs.encode, protocol 5 uses _frombuffer.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _multiarray._reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _multiarray.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer for core in ("core", "_core")},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need; anything else is refused."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # py2 str -> str; numpy reads array data from it
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            allowed = sorted(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise pickle.UnpicklingError(
                f"{self.path}: refusing to load global {module}.{name}; a Caffe2 checkpoint holds numpy "
                f"arrays only (allowed globals: {', '.join(allowed)})"
            )
        return found


def _is_caffe2_training_state(name: str) -> bool:
    return name in CAFFE2_TRAINING_STATE or name.endswith(CAFFE2_MOMENTUM_SUFFIX)


def read_caffe2_pickle(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The parameter blobs of a video-nonlocal-net .pkl, read without running any code.

    Blobs may sit at the top level or under "blobs"; training state (model_iter, lr, epoch,
    *_momentum) is dropped. Raises UnpicklingError for a global other than numpy's array builders,
    TypeError for a file that is not a dict of numeric arrays, naming the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Caffe2 checkpoint at {path}")
    with path.open("rb") as f:
        content = _ArrayUnpickler(f, path).load()
    if isinstance(content, dict) and isinstance(content.get("blobs"), dict):
        content = content["blobs"]
    if not isinstance(content, dict):
        raise TypeError(
            f"{path}: expected a pickled dict of blobs (or {{'blobs': dict}}), got {type(content).__name__}"
        )
    blobs = {}
    for name, value in content.items():
        if not isinstance(name, str):
            raise TypeError(f"{path}: expected blob names as str, got {type(name).__name__} {name!r}")
        if _is_caffe2_training_state(name):
            continue
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            kind = f"array of {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise TypeError(f"{path}: blob {name!r} is a {kind}; expected a numeric numpy array")
        blobs[name] = value
    return blobs


def _as_tensor(name: str, value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        return torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("="), copy=True))
    raise TypeError(f"blob {name!r} is a {type(value).__name__}; expected a numeric numpy array or tensor")


def _fit(value: Tensor, shape: torch.Size) -> Tensor | None:
    """`value` in `shape`: as is, minus trailing 1s (1x1 conv -> Linear), or a 2D kernel inflated."""
    if value.shape == shape:
        return value
    n = len(shape)
    if value.dim() > n and value.shape[:n] == shape and all(d == 1 for d in value.shape[n:]):
        return value.reshape(shape)
    if value.dim() == 4 and n == 5 and value.shape == (shape[0], shape[1], shape[3], shape[4]):
        return inflate_conv_weight(value, shape[2])
    return None


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f", ... ({len(names) - _NAMES_SHOWN} more)" if len(names) > _NAMES_SHOWN else "")


class _Collector:
    """Builds a model's state dict from source tensors, recording missing, mis-shaped and unused names.

    With `strict` False nothing raises: a mis-shaped tensor is kept as it is under the gcnet key and
    an unused source tensor under its own name, for `load_pretrained` / `load_for_finetuning` to judge.
    """

    def __init__(
        self, source: Mapping[str, Tensor], model: nn.Module, origin: str, strict: bool = True
    ) -> None:
        self.source, self.origin, self.model, self.strict = source, origin, model, strict
        self.target = model.state_dict()
        self.state: StateDict = {}
        self.claimed: set[str] = set()
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.mismatched: list[str] = []

    def fetch(self, name: str, key: str) -> Tensor | None:
        """Source tensor `name` in the shape of gcnet `key`; None (and recorded) if absent or mis-shaped."""
        if name not in self.source:
            self.missing.append(name)
            return None
        self.used.add(name)
        value, want = self.source[name], self.target[key]
        fitted = _fit(value, want.shape)
        if fitted is None:
            self.mismatched.append(
                f"{name} -> {key} (checkpoint {tuple(value.shape)}, model {tuple(want.shape)})"
            )
            return None if self.strict else value
        return fitted

    def store(self, key: str, value: Tensor | None) -> None:
        self.claimed.add(key)
        if value is not None:
            self.state[key] = value.to(self.target[key].dtype).clone()

    def copy(self, key: str, name: str) -> None:
        self.store(key, self.fetch(name, key))

    def finish(self) -> StateDict:
        unexpected = [n for n in self.source if n not in self.used]
        if not self.strict:
            return {**self.state, **{n: self.source[n] for n in unexpected}}
        unclaimed = [k for k in self.target if k not in self.claimed]
        problems = [
            f"{len(names)} {label}: {_names(names)}"
            for label, names in (
                ("missing from the checkpoint", self.missing),
                ("unexpected in the checkpoint", unexpected),
                ("mismatched", self.mismatched),
                (f"model keys no {self.origin} has a place for", unclaimed),
            )
            if names
        ]
        if problems:
            raise ValueError(f"{self.origin} does not fit {type(self.model).__name__}: {'; '.join(problems)}")
        return self.state


def _check_model(model: object) -> VideoResNet:
    if not isinstance(model, VideoResNet):
        raise TypeError(
            f"expected a gcnet VideoResNet (c2d_*/i3d_*/slowonly_* models), got {type(model).__name__}"
        )
    return model


def _stages(model: VideoResNet) -> list[ResNetStage]:
    return [model.layer1, model.layer2, model.layer3, model.layer4]  # type: ignore[list-item]


def _nonlocal_blocks(model: VideoResNet) -> list[tuple[str, NonLocal]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NonLocal)]


def _raise_architecture(problems: list[str], origin: str) -> None:
    if problems:
        raise ValueError(
            f"the model computes other outputs than the {origin} it would load: {'; '.join(problems)} "
            "(pass check_architecture=False to load the weights anyway)"
        )


def _triple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * 3


# --- Caffe2 (video-nonlocal-net) ------------------------------------------------------------------


def _caffe2_architecture_problems(model: VideoResNet, blobs: Mapping[str, Tensor], affine: bool) -> list[str]:
    problems = []
    pool = model.maxpool
    if isinstance(pool, nn.MaxPool3d) and _triple(pool.padding)[1:] != (0, 0):
        problems.append(f"pool1 pads {_triple(pool.padding)[1:]} spatially where the released code pads 0 "
                        "(build with stem_pool_padding=0)")
    for name, block in _nonlocal_blocks(model):
        if block.subsample and block.subsample_at != "input":
            problems.append(f"{name} pools phi(x) and g(x) where the released code pools x before them "
                            "(nonlocal_options subsample_at='input')")
    grouped = sorted({m[0] for m in map(_RES3_NONLOCAL.match, blobs) if m is not None})
    if affine and grouped:
        problems.append(f"the file is an affine (USE_AFFINE) model whose res3 non-local blocks {grouped} run "
                        "in groups of 4 frames in the released code; gcnet's attend over all frames (equal "
                        "outputs only for clips with at most 4 frames at res3)")
    return problems


def _caffe2_bn(c: _Collector, key: str, prefix: str, affine: bool, shift: Tensor | None = None) -> None:
    """A Caffe2 SpatialBN (or folded AffineNd) into gcnet BN `key`; `shift` is a conv bias before it."""
    c.copy(f"{key}.weight", f"{prefix}_s")
    c.copy(f"{key}.bias", f"{prefix}_b")
    want = c.target[f"{key}.running_var"]
    if affine:  # BN(x) = x * s + b: mean 0, var + eps = 1
        eps = c.model.get_submodule(key).eps
        mean: Tensor | None = torch.zeros(want.shape, dtype=torch.float64)
        var: Tensor | None = torch.full(want.shape, 1.0 - eps, dtype=torch.float64)
    else:
        mean = c.fetch(f"{prefix}_rm", f"{key}.running_mean")
        var = c.fetch(f"{prefix}_riv", f"{key}.running_var")  # "riv" holds the variance
    if mean is not None and shift is not None:
        mean = mean.to(torch.float64) - shift.to(torch.float64)
    c.store(f"{key}.running_mean", mean)
    c.store(f"{key}.running_var", var)
    c.store(f"{key}.num_batches_tracked", torch.zeros((), dtype=torch.long))


def _caffe2_nonlocal(c: _Collector, key: str, prefix: str, block: NonLocal, affine: bool) -> None:
    for part in ("theta", "phi", "g"):
        if getattr(block, part) is not None:
            c.copy(f"{key}.{part}.weight", f"{prefix}_{part}_w")
            c.copy(f"{key}.{part}.bias", f"{prefix}_{part}_b")
    c.copy(f"{key}.w_z.weight", f"{prefix}_out_w")
    if block.bn is None:
        c.copy(f"{key}.w_z.bias", f"{prefix}_out_b")
    else:  # BN(W y + b) == BN(W y) with running mean m - b
        bias = c.fetch(f"{prefix}_out_b", f"{key}.bn.bias")
        _caffe2_bn(c, f"{key}.bn", f"{prefix}_bn", affine, shift=bias)


def caffe2_to_gcnet(
    blobs: Mapping[str, Blob], model: VideoResNet, *, check_architecture: bool = True, strict: bool = True
) -> StateDict:
    """A complete state dict for `model` from video-nonlocal-net Caffe2 blobs (see the module docstring).

    Training state (model_iter, lr, epoch, *_momentum) is ignored. Files holding only _bn_s / _bn_b
    (no _rm / _riv anywhere) are the affine variant. Raises ValueError naming every missing,
    unexpected or mis-shaped blob, and, with `check_architecture`, any part of `model` that would
    compute other outputs than the released code (pool1 padding, NL sub-sampling, grouped res3 NL).
    `strict=False` returns what matched, plus mis-shaped and unused blobs, for `load_pretrained` /
    `load_for_finetuning` (source "caffe2") to judge.
    """
    model = _check_model(model)
    source = {n: _as_tensor(n, v) for n, v in blobs.items() if not _is_caffe2_training_state(n)}
    affine = not any(name.endswith(("_bn_rm", "_bn_riv")) for name in source)
    if check_architecture:
        _raise_architecture(_caffe2_architecture_problems(model, source, affine), "Caffe2 checkpoint")
    c = _Collector(source, model, "Caffe2 checkpoint", strict)
    c.copy("conv1.weight", "conv1_w")
    _caffe2_bn(c, "bn1", "res_conv1_bn", affine)
    for n, stage in enumerate(_stages(model), start=1):
        for i, block in enumerate(stage):
            key, prefix = f"layer{n}.{i}", f"res{n + 1}_{i}"
            if isinstance(block, Bottleneck):
                for conv, bn, branch in _BOTTLENECK_CONVS:
                    c.copy(f"{key}.{conv}.weight", f"{prefix}_{branch}_w")
                    _caffe2_bn(c, f"{key}.{bn}", f"{prefix}_{branch}_bn", affine)
            if isinstance(block.downsample, nn.Sequential):
                c.copy(f"{key}.downsample.0.weight", f"{prefix}_branch1_w")
                _caffe2_bn(c, f"{key}.downsample.1", f"{prefix}_branch1_bn", affine)
        for i, nl in stage.nonlocal_blocks.items():
            if isinstance(nl, NonLocal):
                _caffe2_nonlocal(c, f"layer{n}.nonlocal_blocks.{i}", f"nonlocal_conv{n + 1}_{i}", nl, affine)
    if isinstance(model.fc, nn.Linear):  # pred_w is (K, C), or (K, C, 1, 1, 1) from the 'test' net
        c.copy("fc.weight", "pred_w")
        c.copy("fc.bias", "pred_b")
    return c.finish()


# --- mmaction2 ------------------------------------------------------------------------------------


def _mmaction2_architecture_problems(model: VideoResNet) -> list[str]:
    problems = []
    pool = model.maxpool
    found = {
        "conv1 stride": _triple(model.conv1.stride),
        "pool1 kernel": _triple(pool.kernel_size) if isinstance(pool, nn.MaxPool3d) else None,
        "pool1 stride": _triple(pool.stride) if isinstance(pool, nn.MaxPool3d) else None,
        "pool1 padding": _triple(pool.padding) if isinstance(pool, nn.MaxPool3d) else None,
    }
    for what, expected in MMACTION2_STEM.items():
        if found[what] != expected:
            problems.append(f"{what} is {found[what]} where mmaction2's I3D has {expected}")
    if not isinstance(model.temporal_pool, nn.MaxPool3d):
        problems.append("no temporal max pool after res2 where mmaction2's I3D has pool2 (2, 1, 1)")
    for name, block in _nonlocal_blocks(model):
        if block.subsample and block.subsample_at != "projections":
            problems.append(f"{name} pools x before phi and g where mmcv pools phi(x) and g(x) "
                            "(nonlocal_options subsample_at='projections')")
    return problems


def _mm_bn(c: _Collector, key: str, name: str) -> None:
    for param in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        c.copy(f"{key}.{param}", f"{name}.{param}")


def _mm_conv_bn(c: _Collector, conv: str, bn: str, name: str) -> None:
    """An mmcv ConvModule (conv + BN) into gcnet's `conv` and `bn`."""
    c.copy(f"{conv}.weight", f"{name}.conv.weight")
    _mm_bn(c, bn, f"{name}.bn")


def _mm_nonlocal(c: _Collector, key: str, name: str, block: NonLocal) -> None:
    """mmcv NonLocal3d: with sub_sample, g and phi are Sequential(ConvModule, MaxPool3d)."""
    for part in ("theta", "phi", "g"):
        if getattr(block, part) is not None:
            wrapped = ".0" if block.subsample and part != "theta" else ""
            c.copy(f"{key}.{part}.weight", f"{name}.{part}{wrapped}.conv.weight")
            c.copy(f"{key}.{part}.bias", f"{name}.{part}{wrapped}.conv.bias")
    if block.concat_project is not None:  # ConvModule(2C', 1, bias=False) + ReLU
        c.copy(f"{key}.concat_project.weight", f"{name}.concat_project.conv.weight")
    c.copy(f"{key}.w_z.weight", f"{name}.conv_out.conv.weight")
    if block.bn is None:  # ConvModule without norm keeps its conv bias
        c.copy(f"{key}.w_z.bias", f"{name}.conv_out.conv.bias")
    else:
        _mm_bn(c, f"{key}.bn", f"{name}.conv_out.bn")


def mmaction2_to_gcnet(
    state: Mapping[str, object], model: VideoResNet, *, check_architecture: bool = True, strict: bool = True
) -> StateDict:
    """A complete state dict for `model` from an mmaction2 ResNet3d (I3D, non-local) checkpoint.

    `state` is the checkpoint's {"state_dict": ..., "meta": ...} or the bare state dict (read it
    with `torch.load(path, weights_only=True)`); keys may lack the `backbone.` prefix (a backbone
    alone). Raises ValueError naming every missing, unexpected or mis-shaped key, and, with
    `check_architecture`, any part of `model` that would compute other outputs than mmaction2's
    I3D (stem strides and pooling, NL sub-sampling). `strict=False` as in `caffe2_to_gcnet`.
    """
    model = _check_model(model)
    source = unwrap_state_dict(state)
    if check_architecture:
        _raise_architecture(_mmaction2_architecture_problems(model), "mmaction2 checkpoint")
    backbone = "backbone." if any(k.startswith("backbone.") for k in source) else ""
    c = _Collector(source, model, "mmaction2 checkpoint", strict)
    _mm_conv_bn(c, "conv1", "bn1", f"{backbone}conv1")
    for n, stage in enumerate(_stages(model), start=1):
        for i, block in enumerate(stage):
            key, name = f"layer{n}.{i}", f"{backbone}layer{n}.{i}"
            if isinstance(block, Bottleneck):
                for conv, bn, _ in _BOTTLENECK_CONVS:
                    _mm_conv_bn(c, f"{key}.{conv}", f"{key}.{bn}", f"{name}.{conv}")
            if isinstance(block.downsample, nn.Sequential):
                _mm_conv_bn(c, f"{key}.downsample.0", f"{key}.downsample.1", f"{name}.downsample")
        for i, nl in stage.nonlocal_blocks.items():
            if isinstance(nl, NonLocal):
                name = f"{backbone}layer{n}.{i}.non_local_block"
                _mm_nonlocal(c, f"layer{n}.nonlocal_blocks.{i}", name, nl)
    if isinstance(model.fc, nn.Linear):
        c.copy("fc.weight", "cls_head.fc_cls.weight")
        c.copy("fc.bias", "cls_head.fc_cls.bias")
    return c.finish()
