"""Checkpoint interop: torchvision, official GCNet / mmdetection and timm state dicts into gcnet models.

Key layouts (all for a GC block at the end of residual block i of stage N):

    gcnet:        layerN.i.context.key.weight (1, C)          .add_transform.{0,1,3}  .scale_transform.*
    mmdet/GCNet:  [backbone.]layerN.i.context_block.conv_mask.weight (1, C, 1, 1)
                  .channel_add_conv.{0,1,3}  (1x1 conv, LayerNorm([C/r, 1, 1]), ReLU, 1x1 conv)
                  .channel_mul_conv.{0,1,3}
    timm:         layerN.i.se.conv_attn.weight (1, C, 1, 1)   .mlp_add.{fc1,norm,fc2}  .mlp_scale.*
                  (timm's SEModule in the same slot: .se.fc1, .se.fc2)

1x1 conv weights (out, in, 1, 1) become Linear weights (out, in); LayerNorm weights (C/r, 1, 1)
become (C/r,). Given a video `model`, 2D conv kernels (O, I, k, k) are inflated to its (O, I, kt,
k, k) by repeating over time and dividing by kt, so a static clip gives the 2D response.

timm's blocks differ from gcnet's defaults in two ways a state dict's keys do not show:
GlobalContext's LayerNorm2d uses eps 1e-6 (gcnet and the official code 1e-5), and timm's widths
are make_divisible(C * rd_ratio, rd_divisor, round_limit=0) = max(d, int(C * rd_ratio + d / 2) // d * d),
i.e. round(C / r) for GlobalContext (d = 1) and the nearest multiple of 8 for SEModule (d = 8),
where gcnet takes C // r. `timm_block_options` reads both from a checkpoint, and a strict
`load_pretrained(..., source="timm")` refuses a model whose LayerNorm eps would change the outputs.
This covers timm's `ResNet` family (`resnet.py`: `seresnet*`, `seresnext*` and any ResNet built
with `block_args=dict(attn_layer="gc" | "gca" | "se")`) with its 7x7 stem and plain downsample;
byobnet's `gcresnet*` / `gcresnext*` (`stages.N.M.attn.*`) are another architecture and do not load.

Files load with `torch.load(weights_only=True)` or safetensors (never unpickling arbitrary code)
and save as safetensors.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from gcnet.blocks import CONTEXT_BLOCKS

Source = Literal["torchvision", "mmdet", "timm", "gcnet", "caffe2", "mmaction2"]
SOURCES: tuple[str, ...] = ("torchvision", "mmdet", "timm", "gcnet", "caffe2", "mmaction2")
VIDEO_SOURCES: tuple[str, ...] = ("caffe2", "mmaction2")
# Keys a fine-tuned model may hold that its checkpoint lacks: context / between-block blocks it adds.
NEW_BLOCK_MARKERS = (".context.", ".nonlocal_blocks.")
# The classifier: created anew when the class count differs, absent from detection backbones.
HEAD_PREFIXES = ("fc.", "pred_", "cls_head.")
StateDict = dict[str, Tensor]
Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Tensor]]

_MMDET_GC = re.compile(r"^(?P<block>layer\d+\.\d+)\.context_block\d*\.(?P<rest>.+)$")
_MMDET_TRANSFORM = {"channel_add_conv": "add_transform", "channel_mul_conv": "scale_transform"}
_TIMM_ATTN = re.compile(r"^(?P<block>layer\d+\.\d+)\.se\.(?P<rest>.+)$")
_TIMM_MLP = {"mlp_add": "add_transform", "mlp_scale": "scale_transform"}
_MLP_NAMES = tuple(_TIMM_MLP)
_RESIDUAL_BLOCK = re.compile(r"^layer(?P<stage>\d+)\.(?P<index>\d+)\.")
# timm's LayerNorm2d (in GlobalContext's ConvMlp) eps; gcnet's GlobalContext takes it as norm_eps.
TIMM_NORM_EPS = 1e-6
_TIMM_SE_KEYS = frozenset({"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})


def unwrap_state_dict(checkpoint: Mapping[str, object]) -> StateDict:
    """The tensors of a checkpoint: unwrap {"state_dict": ...} / {"model": ...}, drop a "module." prefix."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"expected a state dict (mapping of names to tensors), got {type(checkpoint).__name__}"
        )
    for wrapper in ("state_dict", "model", "module"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    skipped = sorted(k for k, v in checkpoint.items() if not isinstance(v, Tensor))
    if skipped:
        raise TypeError(
            f"state dict entries are not tensors: {skipped[:5]}{' ...' if len(skipped) > 5 else ''}"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def inflate_conv_weight(weight: Tensor, temporal_size: int) -> Tensor:
    """(O, I, k, k) -> (O, I, T, k, k): repeat over time and divide by T (sums over time to the 2D kernel)."""
    if weight.dim() != 4:
        raise ValueError(f"expected a 2D conv weight (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if temporal_size < 1:
        raise ValueError(f"temporal_size must be >= 1, got {temporal_size}")
    return weight.unsqueeze(2).repeat(1, 1, temporal_size, 1, 1) / temporal_size  # (O, I, T, kh, kw)


def _vector(weight: Tensor) -> Tensor:
    """A conv / 2D-LayerNorm parameter with trailing 1x1 dims as a Linear / LayerNorm one."""
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):  # 1x1 conv (O, I, 1, 1) -> Linear (O, I)
        return weight.flatten(1)
    if weight.dim() == 3 and weight.shape[1:] == (1, 1):  # LayerNorm([C/r, 1, 1]) -> (C/r,)
        return weight.flatten()
    return weight


def _from_mmdet(state: StateDict) -> StateDict:
    if any(k.startswith("backbone.") for k in state):  # a detector: keep the backbone only
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    out: StateDict = {}
    for key, value in state.items():
        match = _MMDET_GC.match(key)
        if match is None:
            out[key] = value
            continue
        block, rest = match["block"], match["rest"]
        head, _, tail = rest.partition(".")
        if head == "conv_mask":  # W_k: (1, C, 1, 1) -> (1, C); bias (1,)
            out[f"{block}.context.key.{tail}"] = _vector(value)
        elif head in _MMDET_TRANSFORM:  # same indices 0, 1, 3 (conv, LayerNorm, ReLU, conv)
            out[f"{block}.context.{_MMDET_TRANSFORM[head]}.{tail}"] = _vector(value)
        else:  # unknown: keep its name so loading reports it as unexpected
            out[f"{block}.context.{rest}"] = value
    return out


def _from_timm(state: StateDict) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        match = _TIMM_ATTN.match(key)
        if match is None:
            out[key] = value
            continue
        block, rest = match["block"], match["rest"]
        parts = rest.split(".")
        if parts[0] == "conv_attn":  # GlobalContext's W_k
            out[f"{block}.context.key.{parts[-1]}"] = _vector(value)
        elif parts[0] in _MLP_NAMES and len(parts) == 3:  # GlobalContext's ConvMlp: fc1, norm, act, fc2
            mlp, layer, param = parts
            has_norm = f"{block}.se.{mlp}.norm.weight" in state
            index = {"fc1": 0, "norm": 1, "fc2": 3 if has_norm else 2}.get(layer)
            name = f"{block}.context.{_TIMM_MLP[mlp]}.{index if index is not None else layer}.{param}"
            out[name] = _vector(value)
        elif parts[0] in ("fc1", "fc2") and len(parts) == 2:  # SEModule: fc1, ReLU, fc2, sigmoid
            index = 0 if parts[0] == "fc1" else 2
            out[f"{block}.context.scale_transform.{index}.{parts[1]}"] = _vector(value)
        else:
            out[f"{block}.context.{rest}"] = value
    return out


def _timm_block(block: str, params: Mapping[str, Tensor]) -> tuple[str, dict[str, Any], int, int]:
    """(gcnet block name, its options, C, bottleneck width) of one timm attention module."""
    names = set(params)
    if names == _TIMM_SE_KEYS:  # SEModule: fc1 (C/r, C, 1, 1), ReLU, fc2, sigmoid
        hidden, channels = params["fc1.weight"].shape[:2]
        return "se", {}, channels, hidden
    mlps = [m for m in _MLP_NAMES if f"{m}.fc1.weight" in params]
    expected = {
        f"{m}.{layer}.{p}" for m in mlps for layer in ("fc1", "norm", "fc2") for p in ("weight", "bias")
    }
    if "conv_attn.weight" in params:
        expected |= {"conv_attn.weight", "conv_attn.bias"}
    widths = {params[f"{m}.fc1.weight"].shape[:2] for m in mlps}
    if not mlps or names != expected or len(widths) != 1:
        raise ValueError(
            f"{block}.se holds {sorted(names)}; expected timm's GlobalContext ([conv_attn,] mlp_add "
            "and/or mlp_scale, each fc1, norm, fc2, one width) or SEModule (fc1, fc2 with biases, no norm)"
        )
    hidden, channels = widths.pop()
    fusion = "both" if len(mlps) == 2 else _TIMM_MLP[mlps[0]].removesuffix("_transform")
    pooling = "attention" if "conv_attn.weight" in params else "average"
    return "gc", {"pooling": pooling, "fusion": fusion, "norm_eps": TIMM_NORM_EPS}, channels, hidden


def _common_reduction(widths: Mapping[int, int]) -> int | None:
    """The largest r with C // r == width for every (C, width), or None when no single r fits."""
    low = max(channels // (hidden + 1) + 1 for channels, hidden in widths.items())
    high = min(channels // hidden for channels, hidden in widths.items())
    return high if low <= high else None


def _blocks_by_channels(
    block: type[nn.Module], widths: Mapping[int, int], options: Mapping[str, Any]
) -> Callable[[int], nn.Module]:
    """Constructor (channels -> block) giving each C its checkpoint width as `hidden_channels`."""
    widths, options = dict(widths), dict(options)

    def build(channels: int) -> nn.Module:
        if channels not in widths:
            raise ValueError(
                f"the timm checkpoint has blocks for channels {sorted(widths)}, none for {channels}"
            )
        return block(channels, hidden_channels=widths[channels], **options)

    return build


def timm_block_options(checkpoint: Mapping[str, object]) -> dict[str, Any]:
    """Builder options (`context`, `stages`, ...) of the gcnet ResNet a timm ResNet checkpoint loads into.

    Use as `create_model("resnet50", **timm_block_options(sd))`, then `load_pretrained(model, sd,
    "timm")`. Reads timm's attention slot `layerN.i.se.*`: GlobalContext (conv_attn, mlp_add /
    mlp_scale) becomes "gc" with `norm_eps=1e-6`, SEModule (fc1, fc2) becomes "se" (timm's defaults
    ReLU and sigmoid assumed: a state dict does not record activations). Widths come from the
    tensor shapes: when one r gives every stage's width as C // r the options say `reduction=r`;
    otherwise (timm's rounding, e.g. SE width 8 for C = 64) `context` is a constructor giving each
    C its checkpoint width as `hidden_channels`, and such a model is not expressible in a config.
    """
    state = unwrap_state_dict(checkpoint)
    attention: dict[str, dict[str, Tensor]] = {}
    residual: dict[int, set[str]] = {}
    for key, value in state.items():
        match = _TIMM_ATTN.match(key)
        if match is not None:
            attention.setdefault(match["block"], {})[match["rest"]] = value
        in_block = _RESIDUAL_BLOCK.match(key)
        if in_block is not None:
            residual.setdefault(int(in_block["stage"]), set()).add(in_block[0][:-1])  # "layerN.i"
    if not attention:
        if any(k.startswith("stages.") for k in state):
            raise ValueError(
                "the checkpoint is a timm ByobNet (stages.N.M.*, e.g. gcresnet50t, gcresnext26ts): "
                "another architecture (tiered stem, block after the 3x3 conv); gcnet loads timm's "
                "ResNet family (layerN.i.se.*) only"
            )
        raise ValueError(
            "no timm attention blocks (layerN.i.se.*) in the checkpoint; a plain ResNet needs no "
            "block options"
        )
    kinds: dict[tuple[str, tuple[tuple[str, Any], ...]], list[str]] = {}
    widths: dict[int, int] = {}
    for block, params in sorted(attention.items()):
        kind, options, channels, hidden = _timm_block(block, params)
        kinds.setdefault((kind, tuple(sorted(options.items()))), []).append(block)
        if widths.setdefault(channels, hidden) != hidden:
            raise ValueError(
                f"{block}.se has width {hidden} for C={channels} where another block has "
                f"{widths[channels]}; gcnet gives every block of C channels one width"
            )
    if len(kinds) != 1:
        found = {f"{kind} {dict(options)}": blocks[0] for (kind, options), blocks in kinds.items()}
        raise ValueError(f"the checkpoint mixes attention blocks (first of each: {found}); expected one kind")
    ((kind, options),) = kinds
    stages = []
    for stage in range(1, max(residual) + 1):
        blocks = residual.get(stage, set())
        with_block = blocks & set(attention)
        if with_block and with_block != blocks:
            raise ValueError(
                f"stage layer{stage} has attention in {sorted(with_block)} but not in "
                f"{sorted(blocks - with_block)}; gcnet puts a block in every residual block of a stage"
            )
        stages.append(bool(with_block))
    reduction = _common_reduction(widths)
    if reduction is None:
        context = _blocks_by_channels(CONTEXT_BLOCKS[kind], widths, dict(options))
        return {"context": context, "stages": tuple(stages)}
    return {"context": kind, "reduction": reduction, "context_options": dict(options), "stages": tuple(stages)}


def _timm_norm_eps_clashes(state: StateDict, model: nn.Module) -> list[str]:
    """LayerNorms of `model` that receive timm's (eps 1e-6) weights but use another eps."""
    clashes = []
    for key in state:
        match = _TIMM_ATTN.match(key)
        parts = match["rest"].split(".") if match else []
        if parts[1:] != ["norm", "weight"] or parts[0] not in _TIMM_MLP:
            continue
        name = f"{match['block']}.context.{_TIMM_MLP[parts[0]]}.1"
        try:
            norm = model.get_submodule(name)
        except AttributeError:  # no such block: reported as unexpected keys
            continue
        if isinstance(norm, nn.LayerNorm) and norm.eps != TIMM_NORM_EPS:
            clashes.append(f"{name} (LayerNorm eps: checkpoint {TIMM_NORM_EPS:g} (timm), model {norm.eps:g})")
    return clashes


def _fit_to_model(state: StateDict, model: nn.Module) -> StateDict:
    """Inflate 2D conv kernels where `model` holds 3D ones of the same (O, I, k, k)."""
    target = model.state_dict()
    out = {}
    for key, value in state.items():
        want = target.get(key)
        if want is not None and value.dim() == 4 and want.dim() == 5:
            out_channels, in_channels, T, kh, kw = want.shape
            if tuple(value.shape) == (out_channels, in_channels, kh, kw):
                value = inflate_conv_weight(value, T)
        out[key] = value
    return out


def convert_state_dict(
    state_dict: Mapping[str, object], source: Source, model: nn.Module | None = None
) -> StateDict:
    """Convert a `source` ("torchvision", "mmdet", "timm", "gcnet", "caffe2", "mmaction2") state dict
    to gcnet's key layout.

    The mmdet layout may carry a `backbone.` prefix (a detector checkpoint); then only backbone
    keys are kept. Given a video `model`, 2D conv kernels are inflated to its temporal sizes.
    Keys are not checked here; `load_pretrained` reports missing and unexpected ones by name.
    A timm checkpoint needs a model built with its widths and LayerNorm eps: `timm_block_options`.
    The video sources (the Non-local paper's Caffe2 blobs, mmaction2's I3D) need the `model` and
    refuse one that would compute other outputs: `gcnet.models.video_checkpoints`.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
    if source in VIDEO_SOURCES:
        from gcnet.models.video_checkpoints import caffe2_to_gcnet, mmaction2_to_gcnet

        if model is None:
            raise ValueError(f"converting a {source} checkpoint needs the model it goes into")
        convert = caffe2_to_gcnet if source == "caffe2" else mmaction2_to_gcnet
        return convert(state_dict, model, strict=False)  # type: ignore[arg-type]
    state = unwrap_state_dict(state_dict)
    if source == "mmdet":
        state = _from_mmdet(state)
    elif source == "timm":
        state = _from_timm(state)
    if model is not None:
        state = _fit_to_model(state, model)
    return state


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What loading left out: model keys without a value, checkpoint keys without a place, shape clashes.

    `mismatched` also names LayerNorms whose eps differs from a timm checkpoint's (their weights load).
    """

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]

    @property
    def exact(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = []
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
        ):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys)}")
        return "; ".join(parts) if parts else "all keys matched"


def load_state_dict_file(path: str | os.PathLike[str], source: Source | None = None) -> StateDict:
    """Read a state dict from .safetensors, a Caffe2 pickle (source "caffe2": numpy arrays only), or a
    torch file with weights_only=True; no code in the file runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if source == "caffe2":
        from gcnet.models.video_checkpoints import read_caffe2_pickle

        return {name: torch.from_numpy(blob.astype(blob.dtype.newbyteorder("="), copy=True))
                for name, blob in read_caffe2_pickle(path).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def save_state_dict_file(state: nn.Module | Mapping[str, Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a model's (or a state dict's) tensors as safetensors; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"gcnet saves safetensors only; expected a path ending in .safetensors, got {path}")
    tensors = state.state_dict() if isinstance(state, nn.Module) else unwrap_state_dict(state)
    # Own, contiguous copies: safetensors refuses tensors that share storage.
    save_file(
        {k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata={"format": "pt"}
    )
    return path


def load_pretrained(
    model: nn.Module, checkpoint: Checkpoint, source: Source = "torchvision", strict: bool = True
) -> LoadReport:
    """Convert `checkpoint` (a path or a state dict) from `source` and load it into `model`.

    With `strict`, any missing, unexpected or shape-mismatched key raises ValueError naming them
    all, and nothing is loaded. Otherwise every key that matches in name and shape is loaded and
    the report lists the rest (e.g. the new block keys when loading torchvision weights into
    `resnet50_gc_r16`, or fc when the number of classes differs). From timm, a LayerNorm eps other
    than timm's 1e-6 counts as mismatched: the keys fit but the outputs would not be timm's.
    """
    is_path = isinstance(checkpoint, (str, os.PathLike))
    raw = load_state_dict_file(checkpoint, source) if is_path else checkpoint
    state = convert_state_dict(raw, source, model)
    target = model.state_dict()
    missing = tuple(k for k in target if k not in state)
    unexpected = tuple(k for k in state if k not in target)
    mismatched = tuple(
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)})"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    )
    if source == "timm":
        mismatched += tuple(_timm_norm_eps_clashes(unwrap_state_dict(raw), model))
    report = LoadReport(missing, unexpected, mismatched)
    if strict and not report.exact:
        hint = ""
        if source == "timm" and any(".context." in k for k in report.mismatched):
            hint = "; build the model with gcnet.models.convert.timm_block_options(checkpoint)"
        raise ValueError(f"checkpoint from {source!r} does not fit {type(model).__name__}: {report}{hint}")
    clash = {m.split(" ")[0] for m in mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k in target and k not in clash}, strict=False)
    return report


def load_for_finetuning(model: nn.Module, checkpoint: Checkpoint, source: Source = "torchvision") -> LoadReport:
    """Load a pretrained checkpoint into `model` to fine-tune it, refusing anything that does not fit.

    Allowed to stay unmatched: context / between-block blocks the checkpoint has none of (they start
    from their identity init), a classifier (`fc.*`) of another class count (created, not loaded)
    and a checkpoint classifier the model has no place for (a detection backbone). Any other missing,
    unexpected or mis-shaped key raises ValueError naming them, and nothing is loaded then.
    """
    is_path = isinstance(checkpoint, (str, os.PathLike))
    raw = load_state_dict_file(checkpoint, source) if is_path else checkpoint
    state = convert_state_dict(raw, source, model)
    target = model.state_dict()
    head_clash = {k for k, v in state.items() if k in target and v.shape != target[k].shape
                  and k.startswith(HEAD_PREFIXES)}
    missing = [k for k in target if k not in state and not any(m in k for m in NEW_BLOCK_MARKERS)
               and k not in head_clash]
    unexpected = [k for k in state if k not in target and not k.startswith(HEAD_PREFIXES)]
    mismatched = [f"{k} (checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)})" for k, v in state.items()
                  if k in target and v.shape != target[k].shape and k not in head_clash]
    if missing or unexpected or mismatched:
        raise ValueError(f"the {source} checkpoint does not fit {type(model).__name__}: "
                         f"{LoadReport(tuple(missing), tuple(unexpected), tuple(mismatched))}")
    return load_pretrained(model, state, source="gcnet", strict=False)
