"""Slow references written from the papers' equations, independent of the block code.

They read the block's weights by state-dict name and loop over positions, so a disagreement
points at the block, not at a shared helper.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn


def randomize_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every parameter and BN statistic a random value, so zero inits hide nothing."""
    with torch.no_grad():
        for param in module.parameters():
            param.uniform_(-0.6, 0.6, generator=generator)
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.5, 0.5, generator=generator)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5, generator=generator)
    return module


def _softmax(values: list[Tensor]) -> list[Tensor]:
    top = max(v.item() for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _transform(sd: dict[str, Tensor], prefix: str, context: Tensor, layers: list[str]) -> Tensor:
    """W_2 ReLU(LN(W_1 c)) with each piece present as the config says, written out."""
    h = sd[f"{prefix}.0.weight"] @ context + sd[f"{prefix}.0.bias"]
    if len(layers) == 1:
        return h
    index = 1
    if "norm" in layers:
        mean = h.mean()
        var = ((h - mean) ** 2).mean()
        h = (h - mean) / torch.sqrt(var + 1e-5) * sd[f"{prefix}.{index}.weight"] + sd[f"{prefix}.{index}.bias"]
        index += 1
    if "relu" in layers:
        h = torch.where(h > 0, h, torch.zeros_like(h))
        index += 1
    return sd[f"{prefix}.{index}.weight"] @ h + sd[f"{prefix}.{index}.bias"]


def global_context_reference(
    block: nn.Module, x: Tensor, pooling: str, fusion: str, bottleneck: bool, norm: bool, relu: bool
) -> tuple[Tensor, Tensor]:
    """z_i = F(x_i, delta(sum_j alpha_j x_j)) position by position; returns (z, alpha (B, 1, N))."""
    sd = block.state_dict()
    layers = ["linear"]
    if bottleneck:
        layers = ["linear"] + (["norm"] if norm else []) + (["relu"] if relu else []) + ["linear"]
    B, C = x.shape[:2]
    X = x.reshape(B, C, -1)
    N = X.shape[2]
    z = torch.empty_like(X)
    alphas = torch.empty(B, 1, N, dtype=x.dtype)
    for b in range(B):
        if pooling == "attention":
            logits = [torch.dot(sd["key.weight"][0], X[b, :, j]) + sd["key.bias"][0] for j in range(N)]
            alpha = _softmax(logits)
        else:
            alpha = [torch.tensor(1.0 / N, dtype=x.dtype)] * N
        context = sum(alpha[j] * X[b, :, j] for j in range(N))
        alphas[b, 0] = torch.stack(alpha)
        add = _transform(sd, "add_transform", context, layers) if fusion in ("add", "both") else None
        scale = _transform(sd, "scale_transform", context, layers) if fusion in ("scale", "both") else None
        for j in range(N):
            value = X[b, :, j]
            if scale is not None:
                value = value * (1 / (1 + torch.exp(-scale)))
            if add is not None:
                value = value + add
            z[b, :, j] = value
    return z.reshape(x.shape), alphas


POOL_KERNELS = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


def _key_positions(shape: tuple[int, ...], dims: int, subsample: bool) -> list[list[int]]:
    """For each key position, the flat input positions it max-pools (one each without sub-sampling)."""
    if not subsample:
        return [[i] for i in range(math.prod(shape))]
    kernel = POOL_KERNELS[dims]
    pooled = [s // k for s, k in zip(shape, kernel)]
    strides = [math.prod(shape[d + 1 :]) for d in range(dims)]
    groups = []
    for out in itertools.product(*(range(p) for p in pooled)):
        window = itertools.product(*(range(o * k, o * k + k) for o, k in zip(out, kernel)))
        groups.append([sum(i * s for i, s in zip(idx, strides)) for idx in window])
    return groups


def non_local_reference(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j), z_i = BN(W_z y_i) + x_i; returns (z, f/C (B, N, Nk))."""
    sd = block.state_dict()
    mode = block.mode
    B, C = x.shape[:2]
    X = x.reshape(B, C, -1)
    N = X.shape[2]
    groups = _key_positions(tuple(x.shape[2:]), block.dims, block.subsample)
    z = torch.empty_like(X)
    maps = torch.empty(B, N, len(groups), dtype=x.dtype)

    def project(name: str, v: Tensor) -> Tensor:
        return sd[f"{name}.weight"] @ v + sd[f"{name}.bias"]

    pool_input = getattr(block, "subsample_at", "projections") == "input"
    for b in range(B):
        def pooled(name: str | None, group: list[int]) -> Tensor:
            if pool_input:  # the released code: max-pool x, then project
                x_max = torch.stack([X[b, :, p] for p in group]).max(dim=0).values
                return x_max if name is None else project(name, x_max)
            feats = [X[b, :, p] if name is None else project(name, X[b, :, p]) for p in group]
            return torch.stack(feats).max(dim=0).values

        keys = [pooled(None if mode == "gaussian" else "phi", g) for g in groups]
        values = [pooled("g", g) for g in groups]
        for i in range(N):
            query = X[b, :, i] if mode == "gaussian" else project("theta", X[b, :, i])
            if mode in ("gaussian", "embedded_gaussian"):
                weights = _softmax([torch.dot(query, k) * block.scale_factor for k in keys])
            elif mode == "dot_product":
                weights = [torch.dot(query, k) / len(keys) for k in keys]
            else:
                w_f = sd["concat_project.weight"][0]
                weights = [torch.relu(torch.dot(w_f, torch.cat([query, k]))) / len(keys) for k in keys]
            maps[b, i] = torch.stack(weights)
            y = sum(w * v for w, v in zip(weights, values))
            out = sd["w_z.weight"] @ y
            if "w_z.bias" in sd:
                out = out + sd["w_z.bias"]
            if "bn.weight" in sd:
                out = (out - sd["bn.running_mean"]) / torch.sqrt(sd["bn.running_var"] + 1e-5)
                out = out * sd["bn.weight"] + sd["bn.bias"]
            z[b, :, i] = X[b, :, i] + out
    return z.reshape(x.shape), maps
