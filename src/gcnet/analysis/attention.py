"""Capture the attention maps of every non-local and GC block of a model, without changing it.

GCNet (arXiv:1904.11492, Sec. 3.1) compares, per block, the maps of different query positions;
this module records what that needs: each block's input, output and (B, queries, keys) maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gcnet.blocks import GlobalContext, NonLocal


@dataclass
class BlockCapture:
    """One block's view of one batch.

    Attributes:
        kind: "nl-<mode>" for non-local blocks, "gc" for attention-pooling GC/SNL blocks.
        inputs: the block's input x, (B, C, *positions).
        outputs: the block's output z, (B, C, *positions).
        maps: normalised pairwise weights f(x_i, x_j) / C(x), (B, queries, keys). A GC/SNL block
            has one map for every query, (B, 1, N).
        key_shape: position dims of the keys (pooled when the NL block sub-samples).
    """

    kind: str
    inputs: Tensor
    outputs: Tensor
    maps: Tensor
    key_shape: tuple[int, ...]

    @property
    def query_independent(self) -> bool:
        """True when one map serves every query (GC, SNL)."""
        return self.maps.shape[1] == 1


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's blocks that have attention maps: every NonLocal and attention-pooling GlobalContext."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, NonLocal) or (isinstance(module, GlobalContext) and module.pooling == "attention"):
            found[name or type(module).__name__] = module
    return found


def _key_shape(block: nn.Module, spatial: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(block, NonLocal) and block.subsample:
        from gcnet.blocks.non_local import SUBSAMPLE_KERNELS

        return tuple(s // k for s, k in zip(spatial, SUBSAMPLE_KERNELS[block.dims]))
    return spatial


def attention_maps(model: nn.Module, inputs: Tensor, blocks: Iterable[str] | None = None) -> dict[str, BlockCapture]:
    """Run `model` once on `inputs` in eval mode and capture every attention block, keyed by name.

    The model's weights, mode and hooks are as before when this returns; its output is discarded.
    `blocks` restricts the capture to those names (see `attention_blocks`).
    """
    available = attention_blocks(model)
    if not available:
        raise ValueError(f"{type(model).__name__} has no NonLocal or attention-pooling GlobalContext block")
    names = list(available) if blocks is None else list(blocks)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown blocks {unknown}; this model's attention blocks are {list(available)}")
    captures: dict[str, BlockCapture] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0]
            kind = f"nl-{module.mode}" if isinstance(module, NonLocal) else "gc"
            captures[name] = BlockCapture(
                kind, x.detach(), output.detach(), module.attention_map(x).detach(), _key_shape(module, tuple(x.shape[2:]))
            )

        return hook

    handles = [available[n].register_forward_hook(hook_for(n)) for n in names]
    modes = {module: module.training for module in model.modules()}  # e.g. frozen BN stays in eval mode
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for module, training in modes.items():
            module.training = training
        for handle in handles:
            handle.remove()
    return captures
