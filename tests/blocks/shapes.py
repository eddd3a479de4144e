"""Small inputs per position rank, shared by the block tests."""

import torch

# (B, C, *positions); every position dim is even so sub-sampling keeps >= 1 position each.
SHAPES = {1: (2, 8, 6), 2: (2, 8, 4, 4), 3: (2, 8, 2, 4, 4)}


def sample(dims: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPES[dims], dtype=dtype, generator=torch.Generator().manual_seed(seed))
