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

Files load with `torch.load(weights_only=True)` or safetensors (never unpickling arbitrary code)
and save as safetensors.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Union

import torch
from torch import Tensor, nn

Source = Literal["torchvision", "mmdet", "timm", "gcnet"]
SOURCES: tuple[str, ...] = ("torchvision", "mmdet", "timm", "gcnet")
# Keys a fine-tuned model may hold that its checkpoint lacks: context / between-block blocks it adds.
NEW_BLOCK_MARKERS = (".context.", ".nonlocal_blocks.")
# The classifier: created anew when the class count differs, absent from detection backbones.
HEAD_PREFIXES = ("fc.",)
StateDict = dict[str, Tensor]
Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Tensor]]

_MMDET_GC = re.compile(r"^(?P<block>layer\d+\.\d+)\.context_block\d*\.(?P<rest>.+)$")
_MMDET_TRANSFORM = {"channel_add_conv": "add_transform", "channel_mul_conv": "scale_transform"}
_TIMM_ATTN = re.compile(r"^(?P<block>layer\d+\.\d+)\.se\.(?P<rest>.+)$")
_TIMM_MLP = {"mlp_add": "add_transform", "mlp_scale": "scale_transform"}
_MLP_NAMES = tuple(_TIMM_MLP)


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
    """Convert a `source` ("torchvision", "mmdet", "timm", "gcnet") state dict to gcnet's key layout.

    The mmdet layout may carry a `backbone.` prefix (a detector checkpoint); then only backbone
    keys are kept. Given a video `model`, 2D conv kernels are inflated to its temporal sizes.
    Keys are not checked here; `load_pretrained` reports missing and unexpected ones by name.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
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
    """What loading left out: model keys without a value, checkpoint keys without a place, shape clashes."""

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


def load_state_dict_file(path: str | os.PathLike[str]) -> StateDict:
    """Read a state dict from .safetensors, or from a torch file with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
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
    `resnet50_gc_r16`, or fc when the number of classes differs).
    """
    raw = load_state_dict_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state = convert_state_dict(raw, source, model)
    target = model.state_dict()
    missing = tuple(k for k in target if k not in state)
    unexpected = tuple(k for k in state if k not in target)
    mismatched = tuple(
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)})"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    )
    report = LoadReport(missing, unexpected, mismatched)
    if strict and not report.exact:
        raise ValueError(f"checkpoint from {source!r} does not fit {type(model).__name__}: {report}")
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
    raw = load_state_dict_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
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
