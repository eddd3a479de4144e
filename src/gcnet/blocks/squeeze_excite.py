"""Squeeze-and-Excitation block as the GCNet framework's average-pooling, scaling instance.

Hu et al., "Squeeze-and-Excitation Networks", arXiv:1709.01507:

    z_i = x_i * sigmoid(W_2 ReLU(W_1 mean_j x_j))
"""

from __future__ import annotations

from gcnet.blocks.global_context import GlobalContext


class SqueezeExcite(GlobalContext):
    """SE: average pooling, bottleneck C -> C/r -> C with ReLU (no LayerNorm), sigmoid scale.

    Args:
        channels: channels C of input and output.
        reduction: bottleneck divisor r (SENet uses 16).
        hidden_channels: bottleneck width given directly, overriding C // r (timm's SEModule rounds
            C / r to a multiple of 8, e.g. 8 rather than 4 for C = 64).

    Shape:
        input and output (B, C, *positions) with 1, 2 or 3 position dims.
    """

    def __init__(self, channels: int, reduction: int = 16, *, hidden_channels: int | None = None) -> None:
        super().__init__(
            channels,
            reduction=reduction,
            pooling="average",
            fusion="scale",
            norm=False,
            relu=True,
            hidden_channels=hidden_channels,
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, {self._width_repr()}"
