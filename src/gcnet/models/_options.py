"""Strings and option dicts of the builders become block constructors here, once, at build time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Literal, Union

from torch import nn
from typing_extensions import TypedDict

from gcnet.blocks import ContextFactory, get_context_block

# A block given by name ("gc", "snl", "se", "nl"), by a constructor taking `channels`, or absent.
ContextSpec = Union[str, Callable[[int], nn.Module], None]
# Where a context block sits in a residual block.
Position = Literal["before_add", "after_3x3", "after_add"]


class BlockOptions(TypedDict, total=False):
    """Block placement options every backbone builder accepts (ResNet, CIFAR ResNet, C2D/I3D)."""

    num_classes: int
    in_channels: int
    context: ContextSpec
    reduction: int | None
    context_options: Mapping[str, Any] | None
    stages: Sequence[bool]
    position: Position
    nonlocal_indices: Sequence[Sequence[int]] | None
    nonlocal_block: ContextSpec
    nonlocal_options: Mapping[str, Any] | None
    zero_init_residual: bool


def context_factory(
    context: ContextSpec,
    reduction: int | None,
    options: Mapping[str, Any] | None,
    dims: int,
    what: str = "context",
) -> ContextFactory | None:
    """Turn a builder's `context`, `reduction` and `context_options` into a constructor or None.

    `reduction` is a shortcut for `context_options={"reduction": r}`. A non-local block gets the
    network's `dims` (2 for images, 3 for clips) unless the options say otherwise.
    """
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"{what}_options must be a mapping of block options, got {options!r}")
    if context is None:
        if reduction is not None or options:
            raise ValueError(
                f"reduction/{what}_options given without a block; pass {what}='gc', 'snl', 'se' or 'nl'"
            )
        return None
    if isinstance(context, str):
        merged = dict(options or {})
        if reduction is not None:
            if "reduction" in merged:
                raise ValueError(f"reduction given twice: reduction={reduction} and in {what}_options")
            merged["reduction"] = reduction
        if context == "nl":
            merged.setdefault("dims", dims)
        return get_context_block(context, **merged)
    if callable(context):
        if reduction is not None or options:
            raise ValueError(
                f"{what} is a constructor; bind reduction/options into it (functools.partial) "
                f"instead of passing reduction/{what}_options"
            )
        return context
    raise TypeError(
        f"{what} must be a block name ('gc', 'snl', 'se', 'nl'), a constructor taking channels, "
        f"or None; got {context!r}"
    )


def nonlocal_factory(
    block: ContextSpec,
    indices: Sequence[Sequence[int]] | None,
    options: Mapping[str, Any] | None,
    dims: int,
) -> ContextFactory | None:
    """Constructor of the blocks placed between residual blocks; None when no stage asks for one."""
    if indices is None or not any(len(i) for i in indices):
        return None
    return context_factory(block, None, options, dims=dims, what="nonlocal_block")
