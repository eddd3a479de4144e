"""Non-local block with the four pairwise functions of the paper, for 1D, 2D and 3D inputs.

Wang et al., "Non-local Neural Networks", CVPR 2018, arXiv:1711.07971, Eqs. 1-6:

    y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j),    z_i = BN(W_z y_i) + x_i

    gaussian:           f = exp(x_i . x_j),            C(x) = sum_j f
    embedded_gaussian:  f = exp(theta(x_i) . phi(x_j)), C(x) = sum_j f
    dot_product:        f = theta(x_i) . phi(x_j),     C(x) = N
    concatenation:      f = ReLU(w_f . [theta(x_i), phi(x_j)]), C(x) = N

theta, phi, g and W_z are 1x1 convolutions (Linear over channels here). With sub-sampling, phi
(x itself for gaussian) and g are max-pooled, so N counts the pooled key positions; the paper's text
pools their outputs, the released code (video-nonlocal-net) pools x before them (`subsample_at`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gcnet._checks import check_choice, check_input, check_positive_int
from gcnet.blocks._checks import reduced_channels
from gcnet.blocks._fused import (
    BlockwiseAttention,
    composite_requested,
    fused_enabled,
    onednn_attention,
    onednn_attention_forward,
    onednn_float32,
)

Mode = Literal["gaussian", "embedded_gaussian", "dot_product", "concatenation"]
SubsampleAt = Literal["projections", "input"]
SUBSAMPLE_AT: tuple[str, ...] = ("projections", "input")
Scale = Literal["none", "inner", "channels"]

MODES: tuple[str, ...] = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
SOFTMAX_MODES: tuple[str, ...] = ("gaussian", "embedded_gaussian")
SCALES: tuple[str, ...] = ("none", "inner", "channels")
SUBSAMPLE_KERNELS: dict[int, tuple[int, ...]] = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


# Multiply-adds of one projection (B * N * C * C') below which it keeps bmm: there oneDNN's convolution
# costs more than it saves (Zen 5, 2 threads: 0.83-0.9x bmm's speed at 3M-6M, 0.96-1.2x at 13M).
ONEDNN_PROJECTION_MIN_WORK = 1 << 24


def _onednn(x: Tensor, inner_channels: int) -> bool:
    """Whether the projections run as 1x1 convolutions: oneDNN's float32 kernels on CPU, where its
    products are chosen (`gcnet.blocks.onednn_products`: by default where they measured faster).

    bmm goes to MKL, which runs AVX2 code on AMD CPUs: on an AVX-512 Zen 5 the convolutions took
    half the time (32x1024x14x14: 12-16 ms a projection against 29-30 ms; docs/benchmarks.md).
    torch sends a single thread's 1x1 convolutions of batches under 16 to its own GEMM path instead
    (1-4% slower than bmm there): those keep bmm, as do small projections, torch.compile (its graph
    chooses kernels) and traces (their graphs outlive this machine's choice, as the attention's do).
    """
    if torch.jit.is_scripting() or torch.compiler.is_compiling() or torch._C._is_tracing():
        return False
    if not onednn_float32(x) or x.numel() * inner_channels < ONEDNN_PROJECTION_MIN_WORK:
        return False
    return torch.get_num_threads() > 1 or x.shape[0] >= 16


def _project(positions: Tensor, layer: nn.Linear, conv: bool = False) -> Tensor:
    """A 1x1 projection of (B, N, C) positions -> (B, N, C'), contiguous.

    bmm reads the transposed x of an NCHW input in place (F.linear would copy it) and writes the
    contiguous rows SDPA's flash path wants; the bias rides along in baddbmm. With `conv`, contiguous
    positions are the channels-last memory of a (B, C, 1, N) image: oneDNN writes (B, N, C') as its
    channels-last output.
    """
    B, _, C = positions.shape
    if conv:
        image = positions.transpose(1, 2).unsqueeze(2)  # (B, C, 1, N), channels_last strides
        out = F.conv2d(image, layer.weight[:, :, None, None], layer.bias)  # (B, C', 1, N)
        return out.squeeze(2).transpose(1, 2).contiguous()  # a view where the output is channels_last
    return torch.baddbmm(layer.bias, positions, layer.weight.t().expand(B, C, layer.out_features))


def _blockwise_backward_pays(x: Tensor, queries: Tensor) -> bool:
    """On CPU, flash attention's backward is slow for small head dims: measured at 1x64x128x128
    (D = 32) 18.7 s against 6.6 s blockwise; at 2x256x64x64 (D = 128) flash is faster (0.93 s vs 1.27 s).
    """
    return x.device.type == "cpu" and queries.shape[-1] <= 64


class NonLocal(nn.Module):
    """Non-local block: every position attends to every (optionally sub-sampled) position.

    The softmax modes run through `scaled_dot_product_attention` (on CPU in float32 where oneDNN's
    products pay, through its matmul in bands of query rows: `gcnet.blocks.onednn_products`) and the
    dot-product mode as theta (phi^T g) / N, so neither materialises the N x N matrix;
    `attention_map` builds it on request for analysis. The concatenation mode needs the matrix of
    scalars f_ij. The BatchNorm after W_z starts with weight and bias zero, so the block is the
    identity at initialisation.

    Args:
        channels: channels C of input and output.
        mode: pairwise function: "gaussian", "embedded_gaussian" (default), "dot_product" or
            "concatenation".
        dims: position dims of the input: 1 (B, C, L), 2 (B, C, H, W) or 3 (B, C, T, H, W).
        reduction: divisor of the inner channels C' = C // reduction of theta, phi, g (paper: 2).
        subsample: max-pool phi and g with kernel 2, (2, 2) or (1, 2, 2) for 1D, 2D, 3D.
        subsample_at: "projections" pools phi(x) and g(x) (the paper's text, default); "input" pools
            x before phi and g (the released code, so its weights reproduce its outputs).
        scale: factor on the dot products before the softmax: "none" (paper text, default),
            "inner" (1/sqrt(C'), the paper's released code), "channels" (1/sqrt(C), timm), or a
            positive number. Only for the softmax modes.
        norm: BatchNorm after W_z (paper); without it W_z itself starts at zero.

    Shape:
        input and output (B, C, *positions) with `dims` position dims.
    """

    def __init__(
        self,
        channels: int,
        mode: Mode = "embedded_gaussian",
        dims: int = 2,
        reduction: int = 2,
        subsample: bool = False,
        scale: Scale | float = "none",
        norm: bool = True,
        subsample_at: SubsampleAt = "projections",
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.mode = check_choice("mode", mode, MODES)
        if dims not in SUBSAMPLE_KERNELS:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        self.dims = dims
        self.reduction = reduction
        self.inner_channels = reduced_channels(channels, reduction)
        self.subsample = subsample
        self.subsample_at = check_choice("subsample_at", subsample_at, SUBSAMPLE_AT)
        self.scale_factor = self._scale_factor(scale)
        self.scale = scale
        inner = self.inner_channels
        embedded = mode != "gaussian"
        self.theta = nn.Linear(channels, inner) if embedded else None
        self.phi = nn.Linear(channels, inner) if embedded else None
        self.g = nn.Linear(channels, inner)
        self.concat_project = nn.Linear(2 * inner, 1, bias=False) if mode == "concatenation" else None
        self.w_z = nn.Linear(inner, channels, bias=not norm)
        self.bn = nn.BatchNorm1d(channels) if norm else None
        self.reset_parameters()

    def _scale_factor(self, scale: Scale | float) -> float:
        if isinstance(scale, str):
            check_choice("scale", scale, SCALES)
            if scale != "none" and self.mode not in SOFTMAX_MODES:
                raise ValueError(
                    f"scale={scale!r} applies to the softmax modes {list(SOFTMAX_MODES)}; "
                    f"mode {self.mode!r} takes scale='none'"
                )
            key_dim = self.channels if self.mode == "gaussian" else self.inner_channels
            return {"none": 1.0, "inner": key_dim**-0.5, "channels": self.channels**-0.5}[scale]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be one of {list(SCALES)} or a positive number, got {scale!r}")
        if self.mode not in SOFTMAX_MODES:
            raise ValueError(f"a numeric scale applies to the softmax modes {list(SOFTMAX_MODES)}, not {self.mode!r}")
        return float(scale)

    def reset_parameters(self) -> None:
        """Released-code initialisation: projections N(0, 0.01), biases 0, BN (or W_z) zero."""
        for layer in (self.theta, self.phi, self.g, self.concat_project, self.w_z):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        if self.bn is None:
            nn.init.zeros_(self.w_z.weight)
        else:
            self.bn.reset_parameters()
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def _subsample(self, features: Tensor, x: Tensor) -> Tensor:
        """Max-pool key-side features (B, N, D) over the positions of x -> (B, Nk, D), contiguous."""
        if not self.subsample:
            return features.contiguous()
        B, _, D = features.shape
        spatial = features.transpose(1, 2).reshape(B, D, *x.shape[2:])  # (B, D, *positions)
        kernel = SUBSAMPLE_KERNELS[self.dims]
        pooled = _MAX_POOLS[self.dims](spatial, kernel, kernel)  # (B, D, *pooled)
        return pooled.flatten(2).transpose(1, 2).contiguous()  # (B, Nk, D)

    def _check(self, x: Tensor) -> None:
        check_input(type(self).__name__, x, self.channels, (self.dims + 2,))

    def _embed(self, x: Tensor, conv: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, N, D), keys (B, Nk, D) and values (B, Nk, C') of the pairwise function; with
        `conv`, projected by oneDNN's 1x1 convolutions. x is checked by the caller."""
        if self.subsample and not torch.jit.is_tracing():
            kernel = SUBSAMPLE_KERNELS[self.dims]
            if any(size < k for size, k in zip(x.shape[2:], kernel)):
                raise ValueError(
                    f"subsample=True pools by {kernel}; expected position dims >= {kernel}, "
                    f"got {tuple(x.shape[2:])}"
                )
        positions = x.flatten(2).transpose(1, 2)  # (B, N, C), a view in NCHW or channels_last memory
        if conv:
            positions = positions.contiguous()  # one copy of an NCHW x for every projection
        if self.subsample and self.subsample_at == "input":
            pooled = self._subsample(positions, x)  # (B, Nk, C)
            values = _project(pooled, self.g, conv)  # (B, Nk, C')
            if self.theta is None or self.phi is None:
                return positions.contiguous(), pooled, values
            return _project(positions, self.theta, conv), _project(pooled, self.phi, conv), values
        values = self._subsample(_project(positions, self.g, conv), x)  # (B, Nk, C')
        if self.theta is None or self.phi is None:  # gaussian: f compares x_i with (pooled) x_j
            return positions.contiguous(), self._subsample(positions, x), values
        keys = self._subsample(_project(positions, self.phi, conv), x)  # (B, Nk, C')
        return _project(positions, self.theta, conv), keys, values

    def _softmax_weights(self, queries: Tensor, keys: Tensor) -> Tensor:
        """softmax_j(scale * q_i . k_j) as a (B, N, Nk) matrix."""
        return (torch.bmm(queries, keys.transpose(1, 2)) * self.scale_factor).softmax(dim=-1)

    def _concat_logits(self, queries: Tensor, keys: Tensor) -> Tensor:
        """w_f . [theta_i, phi_j] = a . theta_i + b . phi_j, as a (B, N, Nk) matrix."""
        assert self.concat_project is not None
        a, b = self.concat_project.weight.split(self.inner_channels, dim=1)  # (1, C') each
        return F.linear(queries, a) + F.linear(keys, b).transpose(1, 2)  # (B, N, 1) + (B, 1, Nk)

    def attention_map(self, x: Tensor) -> Tensor:
        """Normalised pairwise weights f(x_i, x_j) / C(x), (B, N, Nk); rows of the softmax modes sum to 1."""
        self._check(x)
        queries, keys, _ = self._embed(x, _onednn(x, self.inner_channels))
        if self.mode in SOFTMAX_MODES:
            return self._softmax_weights(queries, keys)
        if self.mode == "dot_product":
            return torch.bmm(queries, keys.transpose(1, 2)) / keys.shape[1]
        return F.relu(self._concat_logits(queries, keys)) / keys.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        conv = _onednn(x, self.inner_channels)
        queries, keys, values = self._embed(x, conv)
        onednn = self.mode in SOFTMAX_MODES and onednn_attention(queries, keys, values)
        blockwise = fused_enabled(x, *self.parameters()) and (onednn or _blockwise_backward_pays(x, queries))
        if self.mode in SOFTMAX_MODES and blockwise:
            # A blockwise backward (BLAS or oneDNN): faster than CPU's flash backward for small head
            # dims, and oneDNN's products for any on AMD CPUs (MKL runs AVX2 code there).
            y = BlockwiseAttention.apply(queries, keys, values, self.scale_factor)  # (B, N, C')
        elif self.mode in SOFTMAX_MODES and composite_requested():
            # Plain ops over the N x N matrix: differentiable to any order (CPU SDPA's backward is not).
            y = torch.bmm(self._softmax_weights(queries, keys), values)  # (B, N, C')
        elif onednn:  # no gradient wanted
            y = onednn_attention_forward(queries, keys, values, self.scale_factor)  # (B, N, C')
        elif self.mode in SOFTMAX_MODES:
            # Contiguous (B, 1, N, D) inputs keep SDPA on its flash path (no N x N matrix).
            y = F.scaled_dot_product_attention(
                queries.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), scale=self.scale_factor
            ).squeeze(1)  # (B, N, C')
        elif self.mode == "dot_product":
            y = torch.bmm(queries, torch.bmm(keys.transpose(1, 2), values)) / keys.shape[1]
        else:
            weights = F.relu(self._concat_logits(queries, keys)) / keys.shape[1]  # (B, N, Nk)
            y = torch.bmm(weights, values)
        B, C = x.shape[:2]
        if conv:
            # oneDNN on (B, C', N) rows: its channels-last output would need a copy for BN and the add.
            rows = y.transpose(1, 2).contiguous().unsqueeze(-1)  # (B, C', N, 1)
            out = F.conv2d(rows, self.w_z.weight[:, :, None, None], self.w_z.bias).view(B, C, y.shape[1])
        else:
            # W_z y written as (B, C, N) directly: BN then reads contiguous channels rows.
            w_z = self.w_z.weight.expand(B, C, self.inner_channels)  # (B, C, C')
            if self.w_z.bias is None:
                out = torch.bmm(w_z, y.transpose(1, 2))  # (B, C, N)
            else:
                out = torch.baddbmm(self.w_z.bias.view(C, 1), w_z, y.transpose(1, 2))  # (B, C, N)
        if self.bn is not None:
            out = self.bn(out)
        return x + out.view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, mode={self.mode!r}, dims={self.dims}, reduction={self.reduction}, "
            f"subsample={self.subsample}, scale={self.scale!r}"
            + (f", subsample_at={self.subsample_at!r}" if self.subsample_at != "projections" else "")
        )
