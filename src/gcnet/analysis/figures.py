"""Figures of the attention analysis: maps of chosen queries over the image, statistics per block."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from gcnet.analysis.attention import BlockCapture

DEFAULT_QUERIES: tuple[tuple[float, float], ...] = ((0.25, 0.25), (0.5, 0.6), (0.8, 0.3))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG (creating its folder) and free it."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def query_map(capture: BlockCapture, sample: int, query: tuple[float, float]) -> tuple[Tensor, tuple[int, int]]:
    """The (h, w) key map of the query at relative (y, x), and the query's (row, col) on the block's grid.

    For space-time blocks the query sits in the middle frame and the map sums its weights over the
    key frames, so every map drawn is the whole attention (it sums to 1), wherever in time it falls.
    """
    spatial = tuple(capture.inputs.shape[2:])
    if len(spatial) not in (2, 3):
        raise ValueError(f"maps over images or clips need 2 or 3 position dims, got {spatial}")
    H, W = spatial[-2:]
    row, col = min(int(query[0] * H), H - 1), min(int(query[1] * W), W - 1)
    frame = spatial[0] // 2 if len(spatial) == 3 else 0
    index = 0 if capture.query_independent else (frame * H + row) * W + col
    keys = capture.maps[sample, index].reshape(capture.key_shape)  # (*key positions)
    if len(spatial) == 3:
        keys = keys.sum(0)
    return keys, (row, col)


def plot_query_maps(
    image: Tensor,
    captures: dict[str, BlockCapture],
    path: str | Path,
    queries: Sequence[tuple[float, float]] = DEFAULT_QUERIES,
    sample: int = 0,
) -> Path:
    """A grid: one row per block, the image with each query's map overlaid (as GCNet's Fig. 1).

    `image` is (3, H, W) in [0, 1] (for clips, the middle frame); queries are relative (y, x).
    Every map is drawn on one colour scale, 0 to the largest weight in the figure, with a colour bar.
    """
    plt = _pyplot()
    shown = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    H, W = image.shape[1:]
    size = (2.6 * len(queries) + 1, 2.6 * len(captures))
    fig, axes = plt.subplots(len(captures), len(queries), figsize=size, squeeze=False, layout="constrained")
    maps = {(name, q): query_map(capture, sample, q) for name, capture in captures.items() for q in queries}
    top = max(float(keys.max()) for keys, _ in maps.values())
    drawn = None
    for row_axes, (name, capture) in zip(axes, captures.items()):
        for ax, query in zip(row_axes, queries):
            keys, (r, c) = maps[name, query]
            upsampled = F.interpolate(keys[None, None].float(), size=(H, W), mode="nearest")[0, 0]
            grid_h, grid_w = capture.inputs.shape[-2:]
            ax.imshow(shown)
            drawn = ax.imshow(upsampled.cpu().numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=top)
            ax.plot((c + 0.5) * W / grid_w - 0.5, (r + 0.5) * H / grid_h - 0.5, "w*", markersize=11)
            ax.set_title(f"{name}\n{capture.kind}, query ({r}, {c})", fontsize=8)
            ax.axis("off")
    bar = fig.colorbar(drawn, ax=axes, shrink=0.8)
    video = any(c.inputs.dim() == 5 for c in captures.values())
    bar.set_label("weight, sum over key frames" if video else "attention weight", fontsize=8)
    return _save(fig, path)


def plot_statistics(summary: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Grouped bars per block: cosine distance of inputs, outputs, attention maps, and JS divergence."""
    plt = _pyplot()
    names = list(summary)
    stats = [("input", "inputs"), ("output", "outputs (z - x)"), ("attention", "attention maps"), ("js", "JS of maps")]
    width = 0.8 / len(stats)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4))
    for i, (key, label) in enumerate(stats):
        values = [0.0 if math.isnan(summary[n][key]) else summary[n][key] for n in names]
        ax.bar([j + (i - 1.5) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), [f"{n}\n{summary[n]['kind']}" for n in names], fontsize=7)
    ax.set_ylabel("mean pairwise distance over queries")
    ax.legend(fontsize=8)
    ax.set_title("Query independence per block (lower = more alike)")
    return _save(fig, path)


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    """The statistics as a markdown table, one row per block."""
    lines = [
        "| block | kind | cos dist. inputs | cos dist. outputs | cos dist. attention maps | JS of maps |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        cells = ["n/a" if math.isnan(row[k]) else f"{row[k]:.4f}" for k in ("input", "output", "attention", "js")]
        lines.append(f"| {name} | {row['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
