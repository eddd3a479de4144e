"""Argument and input checks shared by blocks and models: clear errors instead of failures deep inside."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

LAYOUTS: dict[int, str] = {3: "(B, C, L)", 4: "(B, C, H, W)", 5: "(B, C, T, H, W)"}


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return `value` if it is an int >= `minimum`, else raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise listing them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value  # type: ignore[return-value]


def check_input(
    owner: str,
    x: object,
    channels: int,
    ranks: tuple[int, ...],
    hints: Mapping[int, str] | None = None,
) -> None:
    """Raise unless `x` is a non-empty float (B, C, *positions) tensor of a rank in `ranks`, C = `channels`.

    `owner` names the block or model in the message; `hints` maps a wrong rank to advice appended
    to it (e.g. a clip given to an image model). Skipped while tracing: the example input was
    checked when it ran, and the checks would only add data-dependent branches to the trace.
    """
    if torch.jit.is_tracing():
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        expected = " or ".join(LAYOUTS.get(r, f"rank {r}") for r in ranks)
        hint = (hints or {}).get(x.dim())
        raise ValueError(
            f"{owner} expects input {expected} with C={channels}, got shape {tuple(x.shape)}"
            + (f"; {hint}" if hint else "")
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{owner} expects {channels} input channels (dim 1), got {x.shape[1]} in shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a floating-point input, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{owner} expects a non-empty input, got shape {tuple(x.shape)}")
