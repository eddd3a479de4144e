"""Small inputs per position rank and the gradient check, shared by the block tests."""

import torch
from torch import nn
from torch.func import functional_call

# (B, C, *positions); every position dim is even so sub-sampling keeps >= 1 position each.
SHAPES = {1: (2, 8, 6), 2: (2, 8, 4, 4), 3: (2, 8, 2, 4, 4)}


def sample(dims: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPES[dims], dtype=dtype, generator=torch.Generator().manual_seed(seed))


def gradcheck_block(block: nn.Module, x: torch.Tensor) -> bool:
    """gradcheck of the block's output with respect to its input and every parameter."""
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in block.parameters()]

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return functional_call(block, dict(zip(names, params)), (x,))

    return torch.autograd.gradcheck(fn, (x.detach().requires_grad_(True), *params), eps=1e-6, atol=1e-7)
