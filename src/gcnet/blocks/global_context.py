"""The three-step global context framework of GCNet and its GC block.

Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
arXiv:1904.11492, and "Global Context Networks" (TPAMI 2020), arXiv:2012.13375.

    z_i = F(x_i, delta(sum_j alpha_j x_j))
    GC block: z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k x_j) x_j))

Context modeling gives the weights alpha (attention: softmax of W_k x over all positions;
average: 1/N), the transform delta maps the context vector (C) to C channels, and fusion F
broadcasts it to every position (add, sigmoid scale, or both).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from gcnet._checks import check_choice, check_input, check_positive_int
from gcnet.blocks._checks import reduced_channels
from gcnet.blocks._fused import AttentionPoolAdd, attention_logits, attention_pool, fused_enabled

Pooling = Literal["attention", "average"]
Fusion = Literal["add", "scale", "both"]

POOLINGS: tuple[str, ...] = ("attention", "average")
FUSIONS: tuple[str, ...] = ("add", "scale", "both")
SPATIAL_RANKS = (3, 4, 5)


class ContextTransform(nn.Sequential):
    """Transform of the context vector: Linear C->C/r [LayerNorm] [ReLU] Linear C/r->C, or Linear C->C.

    Works on (B, C) vectors; a Linear here is the paper's 1x1 conv on a 1x1 map. With LayerNorm
    and ReLU the indices (0, 1, 3) match mmdetection's `channel_add_conv.{0,1,3}`.

    Args:
        channels: channels C of the context vector.
        reduction: bottleneck divisor r, or None for a single C -> C layer (the SNL's W_v).
        norm: LayerNorm after the first layer (GCNet's choice for easier optimisation).
        relu: ReLU after the first layer (and its norm).
    """

    def __init__(self, channels: int, reduction: int | None, norm: bool, relu: bool) -> None:
        check_positive_int("channels", channels)
        if reduction is None:
            if norm or relu:
                raise ValueError(
                    "norm and relu belong to the bottleneck; with reduction=None (one C -> C layer) "
                    f"pass norm=False and relu=False, got norm={norm}, relu={relu}"
                )
            super().__init__(nn.Linear(channels, channels))
            return
        hidden = reduced_channels(channels, reduction)
        layers: list[nn.Module] = [nn.Linear(channels, hidden)]
        if norm:
            layers.append(nn.LayerNorm(hidden))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(hidden, channels))
        super().__init__(*layers)

    @property
    def last(self) -> nn.Linear:
        """The layer whose output is fused; zeroed to start an add block as identity."""
        return self[-1]  # type: ignore[return-value]


class GlobalContext(nn.Module):
    """Global context block: pool one context vector, transform it, fuse it into every position.

    Every cell of GCNet's ablation grid is one configuration: the defaults are the paper's GC block
    (attention pooling, r=16, LayerNorm + ReLU, add); `SimplifiedNonLocal` and `SqueezeExcite` are
    the framework's other instantiations. The last layer of an add transform starts at zero, so an
    add block is the identity at initialisation.

    Args:
        channels: channels C of input and output.
        reduction: bottleneck divisor r (transform C -> C // r -> C), or None for one C -> C layer.
        pooling: "attention" (softmax over positions of a 1x1 projection W_k) or "average" (SE).
        fusion: "add" (broadcast add), "scale" (multiply by a sigmoid gate, SE), or "both"
            (scale, then add; each with its own transform).
        norm: LayerNorm inside the bottleneck.
        relu: ReLU inside the bottleneck.

    Shape:
        input and output (B, C, *positions) with 1, 2 or 3 position dims: (B, C, L),
        (B, C, H, W) or (B, C, T, H, W).
    """

    def __init__(
        self,
        channels: int,
        reduction: int | None = 16,
        pooling: Pooling = "attention",
        fusion: Fusion = "add",
        norm: bool = True,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.reduction = reduction
        self.pooling = check_choice("pooling", pooling, POOLINGS)
        self.fusion = check_choice("fusion", fusion, FUSIONS)
        self.key = nn.Linear(channels, 1) if pooling == "attention" else None
        self.scale_transform = (
            ContextTransform(channels, reduction, norm, relu) if fusion in ("scale", "both") else None
        )
        self.add_transform = (
            ContextTransform(channels, reduction, norm, relu) if fusion in ("add", "both") else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper initialisation: W_k Kaiming (fan-in), last layer of the add transform zero."""
        if self.key is not None:
            nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.key.bias)
        for transform in (self.scale_transform, self.add_transform):
            if transform is not None:
                for layer in transform:
                    if hasattr(layer, "reset_parameters"):
                        layer.reset_parameters()
        if self.add_transform is not None:
            nn.init.zeros_(self.add_transform.last.weight)
            nn.init.zeros_(self.add_transform.last.bias)

    def attention_map(self, x: Tensor) -> Tensor:
        """Pooling weights alpha_j over positions, (B, 1, N); uniform for average pooling."""
        check_input(type(self).__name__, x, self.channels, SPATIAL_RANKS)
        return self._weights(x.flatten(2))

    def context(self, x: Tensor) -> Tensor:
        """The pooled context vector sum_j alpha_j x_j, (B, C)."""
        check_input(type(self).__name__, x, self.channels, SPATIAL_RANKS)
        return self._pool(x.flatten(2))

    def _weights(self, positions: Tensor) -> Tensor:
        if self.key is None:
            B, _, N = positions.shape
            return positions.new_full((B, 1, N), 1.0 / N)
        return attention_logits(positions, self.key.weight, self.key.bias).softmax(dim=-1)  # (B, 1, N)

    def _pool(self, positions: Tensor) -> Tensor:
        if self.key is None:
            return positions.mean(dim=-1)  # (B, C)
        return attention_pool(positions, self.key.weight, self.key.bias)[1]  # (B, C)

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self.channels, SPATIAL_RANKS)
        if self.key is not None and self.scale_transform is None and self.add_transform is not None:
            params = list(self.add_transform.parameters())
            if fused_enabled(x, self.key.weight, self.key.bias, *params):
                # Attention pooling + add: one autograd function, backward in one pass over x.
                return AttentionPoolAdd.apply(x, self.key.weight, self.key.bias, self.add_transform, *params)
        context = self._pool(x.flatten(2))  # (B, C)
        broadcast = context.shape + (1,) * (x.dim() - 2)  # (B, C, 1, ...)
        add = None if self.add_transform is None else self.add_transform(context).view(broadcast)
        if self.scale_transform is None:
            return x + add
        gate = torch.sigmoid(self.scale_transform(context)).view(broadcast)
        return x * gate if add is None else torch.addcmul(add, x, gate)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduction={self.reduction}, pooling={self.pooling!r}, "
            f"fusion={self.fusion!r}"
        )
