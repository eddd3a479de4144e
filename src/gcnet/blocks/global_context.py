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

import math
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from gcnet._checks import check_choice, check_input, check_positive_int
from gcnet.blocks._checks import reduced_channels
from gcnet.blocks._fused import (
    ContextFusion,
    ContextTransforms,
    attention_logits,
    attention_pool,
    fuse,
    fused_enabled,
    position_sums,
    residual_relu,
)

Pooling = Literal["attention", "average"]
Fusion = Literal["add", "scale", "both"]

POOLINGS: tuple[str, ...] = ("attention", "average")
FUSIONS: tuple[str, ...] = ("add", "scale", "both")
SPATIAL_RANKS = (3, 4, 5)
# The bottleneck LayerNorm's eps: PyTorch's and the official GCNet / mmdetection code's (timm: 1e-6).
NORM_EPS = 1e-5


def check_norm_eps(value: object) -> float:
    """Return `value` as a float if it is a finite number > 0, else raise naming `norm_eps`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"norm_eps must be a float, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"norm_eps must be a finite number > 0 (e.g. 1e-5, or timm's 1e-6), got {value}")
    return float(value)


class ContextTransform(nn.Sequential):
    """Transform of the context vector: Linear C->C/r [LayerNorm] [ReLU] Linear C/r->C, or Linear C->C.

    Works on (B, C) vectors; a Linear here is the paper's 1x1 conv on a 1x1 map. With LayerNorm
    and ReLU the indices (0, 1, 3) match mmdetection's `channel_add_conv.{0,1,3}`.

    Args:
        channels: channels C of the context vector.
        reduction: bottleneck divisor r, or None for a single C -> C layer (the SNL's W_v).
        norm: LayerNorm after the first layer (GCNet's choice for easier optimisation).
        relu: ReLU after the first layer (and its norm).
        hidden_channels: bottleneck width given directly, in place of C // r (timm rounds C / r).
        norm_eps: eps of the LayerNorm (1e-5 as the official code; timm's is 1e-6).
    """

    def __init__(
        self,
        channels: int,
        reduction: int | None,
        norm: bool,
        relu: bool,
        *,
        hidden_channels: int | None = None,
        norm_eps: float = NORM_EPS,
    ) -> None:
        check_positive_int("channels", channels)
        norm_eps = check_norm_eps(norm_eps)
        if reduction is None:
            if norm or relu or hidden_channels is not None:
                raise ValueError(
                    "norm, relu and hidden_channels belong to the bottleneck; with reduction=None "
                    "(one C -> C layer) pass norm=False, relu=False and hidden_channels=None, "
                    f"got norm={norm}, relu={relu}, hidden_channels={hidden_channels}"
                )
            super().__init__(nn.Linear(channels, channels))
            return
        if hidden_channels is None:
            hidden = reduced_channels(channels, reduction)
        else:
            check_positive_int("reduction", reduction)
            hidden = check_positive_int("hidden_channels", hidden_channels)
        layers: list[nn.Module] = [nn.Linear(channels, hidden)]
        if norm:
            if hidden <= 2:
                effect = ("outputs only its bias: the transform ignores the context" if hidden == 1 else
                          "outputs about +-1: the transform sees only which of the two is larger")
                warnings.warn(f"LayerNorm over a {hidden}-channel bottleneck (channels={channels}, "
                              f"reduction={reduction}) {effect}; use hidden_channels >= 3 or a smaller "
                              "reduction", UserWarning, stacklevel=3)
            layers.append(nn.LayerNorm(hidden, eps=norm_eps))
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
        hidden_channels: bottleneck width given directly, overriding C // r; loads checkpoints whose
            widths were rounded another way (timm: round(C / r), SE to multiples of 8).
        norm_eps: eps of the bottleneck LayerNorm; 1e-5 (official GCNet code), timm uses 1e-6.

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
        *,
        hidden_channels: int | None = None,
        norm_eps: float = NORM_EPS,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.reduction = reduction
        self.hidden_channels = hidden_channels
        self.norm_eps = check_norm_eps(norm_eps)
        self.pooling = check_choice("pooling", pooling, POOLINGS)
        self.fusion = check_choice("fusion", fusion, FUSIONS)
        self.key = nn.Linear(channels, 1) if pooling == "attention" else None

        def transform() -> ContextTransform:
            return ContextTransform(
                channels, reduction, norm, relu, hidden_channels=hidden_channels, norm_eps=norm_eps
            )

        self.scale_transform = transform() if fusion in ("scale", "both") else None
        self.add_transform = transform() if fusion in ("add", "both") else None
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
            return position_sums(positions, mean=True)  # (B, C)
        return attention_pool(positions, self.key.weight, self.key.bias)[1]  # (B, C)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, None)

    def forward_residual(self, x: Tensor, residual: Tensor) -> Tensor:
        """ReLU(self(x) + residual): the block where a residual block ends, fused with its add and ReLU.

        The same numbers as the three ops, with one pass fewer over x (its output is never stored).
        Forward hooks are not called: where the block has hooks, call it, then add and apply ReLU.
        """
        if residual.shape != x.shape:
            raise ValueError(
                f"{type(self).__name__}: expected a residual of the input's shape {tuple(x.shape)}, "
                f"got {tuple(residual.shape)}"
            )
        return self._forward(x, residual)

    def _forward(self, x: Tensor, residual: Tensor | None) -> Tensor:
        check_input(type(self).__name__, x, self.channels, SPATIAL_RANKS)
        if x.device.type == "cpu" and torch.is_grad_enabled():
            key = (None, None) if self.key is None else (self.key.weight, self.key.bias)
            modules = [t for t in (self.scale_transform, self.add_transform) if t is not None]
            params = [p for t in modules for p in t.parameters()]
            extra = () if residual is None else (residual,)
            if fused_enabled(x, *key, *extra, *params):
                # The whole block as one autograd function: backward in two passes over x. On CUDA the
                # composite ops measured faster and smaller (fewer launches; docs/benchmarks.md, "CUDA").
                transforms = ContextTransforms(self.scale_transform, self.add_transform)
                return ContextFusion.apply(x, *key, transforms, residual, *params)
        terms = self._transforms(self._pool(x.flatten(2)))
        return fuse(x, *terms) if residual is None else residual_relu(x, residual, *terms)

    def _transforms(self, context: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The sigmoid gate and the add term, (B, C) each, of the context (None where unused)."""
        return ContextTransforms(self.scale_transform, self.add_transform)(context)

    def _width_repr(self) -> str:
        """`reduction=r`, or `hidden_channels=h` where that overrides it; `norm_eps` where not 1e-5."""
        width = (
            f"reduction={self.reduction}"
            if self.hidden_channels is None
            else f"hidden_channels={self.hidden_channels}"
        )
        return width + ("" if self.norm_eps == NORM_EPS else f", norm_eps={self.norm_eps:g}")

    def extra_repr(self) -> str:
        return f"channels={self.channels}, {self._width_repr()}, pooling={self.pooling!r}, fusion={self.fusion!r}"
