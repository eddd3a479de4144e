"""Small inputs and weight randomisation shared by the model tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

VIDEO_PREFIXES = ("c2d_", "i3d_", "slowonly_")


def is_video(name: str) -> bool:
    return name.startswith(VIDEO_PREFIXES)


def small_input(name: str, batch: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    """The cheapest input every registered model accepts: 32 x 32 images or 4 x 32 x 32 clips."""
    shape = (batch, 3, 4, 32, 32) if is_video(name) else (batch, 3, 32, 32)
    return torch.randn(shape, dtype=dtype)


def randomize_(module: nn.Module, scale: float = 0.5, seed: int = 0) -> nn.Module:
    """Random values for every parameter and BN statistic, so zero inits hide nothing.

    Conv weights get a fan-in scale so activations stay O(1) through deep nets.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            std = scale / fan_in**0.5 if param.dim() > 1 else scale
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype) * std
            if param.dim() == 1 and name.endswith("weight"):  # norm weights near 1
                noise = 1.0 + noise
            param.copy_(noise)
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype) + 0.5)
    return module
