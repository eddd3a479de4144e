"""Argument checks of the blocks alone; the checks shared with the models live in `gcnet._checks`."""

from __future__ import annotations

from gcnet._checks import check_positive_int


def reduced_channels(channels: int, reduction: int) -> int:
    """Channels of a C -> C // r bottleneck; raise if nothing is left."""
    check_positive_int("reduction", reduction)
    if channels // reduction < 1:
        raise ValueError(
            f"reduction={reduction} leaves no channels for channels={channels}; "
            f"expected reduction <= {channels}"
        )
    return channels // reduction
