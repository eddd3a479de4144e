"""Weight decay only where it belongs, and the per-step warmup + cosine/step learning-rate factor."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


# Modules whose every parameter is a scale/shift of a normalisation: decaying them only shrinks the
# features (and the GC block's LayerNorm weight is (C, 1, 1), so "ndim <= 1" alone would miss it).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Two groups: decayed weights, and norm weights + biases + other 1-d parameters at decay 0."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = isinstance(module, NORM_TYPES) or name.endswith("bias") or param.ndim <= 1
            (no_decay if exempt and not decay_norm_and_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(
    step: int,
    steps_per_epoch: int,
    epochs: int,
    name: str,
    warmup_epochs: float,
    warmup_start_factor: float,
    milestones: Sequence[int],
    gamma: float,
    min_lr_factor: float,
) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based)."""
    total = max(epochs * steps_per_epoch, 1)
    warmup = round(warmup_epochs * steps_per_epoch)
    if step < warmup:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup
    if name == "constant":
        return 1.0
    if name == "step":
        epoch = step / steps_per_epoch
        return gamma ** sum(epoch >= m for m in milestones)
    if name == "cosine":
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {name!r}; expected one of ['cosine', 'step', 'constant']")
