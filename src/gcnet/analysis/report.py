"""The attention analysis as one call: statistics over a set of inputs, figures and a markdown report."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from gcnet.analysis.attention import attention_maps
from gcnet.analysis.figures import markdown_table, plot_query_maps, plot_statistics
from gcnet.analysis.statistics import QueryStatistics

logger = logging.getLogger("gcnet.analysis")


def _displayable(sample: Tensor) -> Tensor:
    """(3, H, W) in [0, 1] from a normalised image (3, H, W) or clip (3, T, H, W; middle frame)."""
    image = sample[:, sample.shape[1] // 2] if sample.dim() == 4 else sample
    low, high = image.amin(), image.amax()
    return (image - low) / (high - low).clamp_min(1e-12)


def analyze(
    model: nn.Module, batches: Iterable[Tensor], out_dir: str | Path, max_batches: int | None = None
) -> dict[str, dict[str, float]]:
    """Accumulate the query statistics of every attention block over `batches` of inputs and write
    `statistics.png`, `attention_maps.png` (first input) and `report.md` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    running = QueryStatistics()
    first: tuple[Tensor, dict] | None = None
    for index, inputs in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        captures = attention_maps(model, inputs)
        running.update(captures)
        if first is None:
            first = (inputs[0].detach().cpu(), {k: v for k, v in captures.items()})
    if first is None:
        raise ValueError("analyze got no inputs: the data source is empty")
    summary = running.summary()
    plot_statistics(summary, out / "statistics.png")
    plot_query_maps(_displayable(first[0]), first[1], out / "attention_maps.png")
    lines = [
        "# Attention analysis",
        "",
        "Mean pairwise cosine distance (1 - cos) over query positions, per block, and the mean",
        "Jensen-Shannon divergence (nats, at most ln 2 = 0.693) between the attention maps of",
        "different queries (GCNet, arXiv:1904.11492, Sec. 3.1). GC/SNL blocks use one map for every",
        "query, so their map distances are 0 by construction; n/a marks a statistic that is undefined",
        "there (e.g. JS for dot-product maps, which have negative weights).",
        "",
        markdown_table(summary),
        "![statistics](statistics.png)",
        "",
        "![attention maps of three query points](attention_maps.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def batches_of(dataset: torch.utils.data.Dataset, batch_size: int) -> Iterable[Tensor]:
    """The inputs of an (input, label) dataset in batches, in order; corrupt files are skipped and logged.

    Multi-clip video items (K, C, T, H, W) come out as K clips each: (B * K, C, T, H, W).
    """
    from gcnet.data.sampling import collate_skipping

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping)
    for batch in loader:
        for path in batch["skipped"]:
            logger.warning("analysis skipped corrupt file %s", path)
        inputs = batch["input"]
        if inputs is None:
            continue
        yield inputs.flatten(0, 1) if inputs.dim() == 6 else inputs
