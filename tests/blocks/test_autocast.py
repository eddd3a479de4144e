"""Every block and mode runs forward and backward under CPU bf16 autocast, on fp32 inputs and on the bf16
inputs a block gets inside a network (the previous conv ran in bf16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gcnet.blocks import GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite

BLOCKS: dict[str, nn.Module] = {
    "gc": GlobalContext(16, reduction=4),
    "gc-scale": GlobalContext(16, reduction=4, fusion="scale"),
    "gc-both-average": GlobalContext(16, reduction=4, pooling="average", fusion="both"),
    "snl": SimplifiedNonLocal(16),
    "se": SqueezeExcite(16, reduction=4),
    **{f"nl-{mode}{'-sub' if sub else ''}": NonLocal(16, mode=mode, subsample=sub)
       for mode in ("gaussian", "embedded_gaussian", "dot_product", "concatenation") for sub in (False, True)},
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 16, 4, 6, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-input", "bf16-input"])
def test_bf16_autocast_forward_and_backward(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    block = BLOCKS[name]
    if isinstance(block, NonLocal):
        block = NonLocal(16, mode=block.mode, subsample=block.subsample, dims=len(shape) - 2)
    for p in block.parameters():  # non-zero last layers, so every gradient path carries signal
        nn.init.normal_(p, std=0.1)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.float().square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())
