"""Input and argument checks shared by the blocks: clear errors instead of shape mismatches deep inside."""

from __future__ import annotations

import torch
from torch import Tensor


def check_positive_int(name: str, value: object) -> int:
    """Return `value` if it is a positive int, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise listing them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value  # type: ignore[return-value]


def reduced_channels(channels: int, reduction: int) -> int:
    """Channels of a C -> C // r bottleneck; raise if nothing is left."""
    check_positive_int("reduction", reduction)
    if channels // reduction < 1:
        raise ValueError(
            f"reduction={reduction} leaves no channels for channels={channels}; "
            f"expected reduction <= {channels}"
        )
    return channels // reduction


def check_input(block: str, x: Tensor, channels: int, ranks: tuple[int, ...]) -> None:
    """Raise if `x` is not a float (B, C, *positions) tensor of the expected rank and channels.

    Skipped while tracing: the example input was checked when it ran, and the checks would
    only add data-dependent branches to the trace.
    """
    if torch.jit.is_tracing():
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{block} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        layouts = {3: "(B, C, L)", 4: "(B, C, H, W)", 5: "(B, C, T, H, W)"}
        expected = " or ".join(layouts.get(r, f"rank {r}") for r in ranks)
        raise ValueError(f"{block} expects input {expected}, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{block} expects {channels} channels (dim 1), got {x.shape[1]} in shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{block} expects a floating-point input, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{block} expects a non-empty input, got shape {tuple(x.shape)}")
