"""Query-independence statistics of GCNet (arXiv:1904.11492, Table 1), per block.

For each block, the mean pairwise cosine distance (1 - cos) over positions of (a) the block
inputs x_i, (b) the block outputs z_i - x_i and (c) the attention maps of the queries, plus the
mean pairwise Jensen-Shannon divergence between the attention maps. Small (c) means the maps are
nearly the same for every query, the paper's finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gcnet.analysis.attention import BlockCapture

STATISTICS = ("input", "output", "attention", "js")


def _query_subset(n: int, max_queries: int | None) -> Tensor:
    """Evenly spaced query indices, all of them when `max_queries` is None or >= n."""
    if max_queries is None or n <= max_queries:
        return torch.arange(n)
    return torch.linspace(0, n - 1, max_queries).round().long().unique()


def mean_cosine_distance(vectors: Tensor) -> Tensor:
    """Mean of 1 - cos(v_i, v_j) over ordered pairs i != j, per sample: (B, N, D) -> (B,).

    NaN for a sample with a zero vector (its cosine is undefined) or fewer than two vectors.
    """
    B, N, _ = vectors.shape
    if N < 2:
        return vectors.new_full((B,), math.nan)
    vectors = vectors.double()
    norms = vectors.norm(dim=-1)  # (B, N)
    unit = vectors / norms.clamp_min(torch.finfo(vectors.dtype).tiny).unsqueeze(-1)
    gram = torch.bmm(unit, unit.transpose(1, 2))  # (B, N, N)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    distance = 1 - off_diagonal / (N * (N - 1))
    return distance.masked_fill((norms == 0).any(dim=-1), math.nan)


def mean_js_divergence(maps: Tensor, max_elements: int = 2**25) -> Tensor:
    """Mean Jensen-Shannon divergence (nats, in [0, ln 2]) over ordered pairs of rows: (B, N, K) -> (B,).

    Rows are renormalised to sum to 1. NaN where a map has negative weights (the dot-product mode)
    or an all-zero row: those are not distributions. Pairs are taken in chunks of at most
    `max_elements` mixture entries, to bound memory.
    """
    B, N, K = maps.shape
    if N < 2:
        return maps.new_full((B,), math.nan)
    maps = maps.double()
    sums = maps.sum(-1, keepdim=True)
    invalid = (maps < 0).flatten(1).any(-1) | (sums.squeeze(-1) <= 0).any(-1)
    p = maps / sums.clamp_min(torch.finfo(maps.dtype).tiny)

    def entropy(q: Tensor) -> Tensor:
        return -torch.special.xlogy(q, q).sum(-1)

    h = entropy(p)  # (B, N)
    total = maps.new_zeros(B)
    chunk = max(1, max_elements // (B * N * K))
    for start in range(0, N, chunk):
        rows = p[:, start : start + chunk]  # (B, n, K)
        mixture = (rows.unsqueeze(2) + p.unsqueeze(1)) / 2  # (B, n, N, K)
        js = entropy(mixture) - (h[:, start : start + chunk, None] + h[:, None, :]) / 2  # (B, n, N)
        total += js.sum(dim=(1, 2))
    return (total / (N * (N - 1))).masked_fill(invalid, math.nan)


def block_statistics(capture: BlockCapture, max_queries: int | None = 1024) -> dict[str, Tensor]:
    """The four statistics of one capture, per sample (B,); up to `max_queries` evenly spaced positions."""
    positions = capture.inputs.flatten(2).transpose(1, 2)  # (B, N, C)
    delta = (capture.outputs - capture.inputs).flatten(2).transpose(1, 2)  # (B, N, C)
    queries = _query_subset(positions.shape[1], max_queries)
    stats = {"input": mean_cosine_distance(positions[:, queries]), "output": mean_cosine_distance(delta[:, queries])}
    if capture.query_independent:
        zero = positions.new_zeros(positions.shape[0], dtype=torch.float64)
        stats["attention"], stats["js"] = zero, zero.clone()
    else:
        maps = capture.maps[:, queries]
        stats["attention"], stats["js"] = mean_cosine_distance(maps), mean_js_divergence(maps)
    return stats


@dataclass
class QueryStatistics:
    """Running per-block means of the statistics over batches of images or clips."""

    max_queries: int | None = 1024
    sums: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def update(self, captures: dict[str, BlockCapture]) -> None:
        """Add one batch of captures (NaN samples are left out of that statistic's mean)."""
        for name, capture in captures.items():
            self.kinds[name] = capture.kind
            for stat, values in block_statistics(capture, self.max_queries).items():
                finite = values[~values.isnan()]
                self.sums.setdefault(name, {}).setdefault(stat, 0.0)
                self.counts.setdefault(name, {}).setdefault(stat, 0)
                self.sums[name][stat] += float(finite.sum())
                self.counts[name][stat] += int(finite.numel())

    def summary(self) -> dict[str, dict[str, float]]:
        """{block: {"kind", "input", "output", "attention", "js"}} means; NaN where nothing was defined."""
        return {
            name: {"kind": self.kinds[name]}  # type: ignore[dict-item]
            | {s: (self.sums[name][s] / self.counts[name][s]) if self.counts[name][s] else math.nan for s in STATISTICS}
            for name in self.sums
        }
