"""Evaluation: loss, top-1 and top-5 over a dataset, sharded over ranks, multi-clip scores averaged."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gcnet.data.sampling import ShardSampler, collate_skipping
from gcnet.engine.distributed import DistContext, all_reduce_sum
from gcnet.engine.metrics import topk_correct

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision context: bf16 on CPU or CUDA, fp16 on CUDA only; fp32 does nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs CUDA; on CPU use 'bf16' or 'fp32'")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def channels_last_format(t: Tensor) -> torch.memory_format | None:
    """channels_last for a 4-d tensor, channels_last_3d for a 5-d one, None for other ranks."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """Move a batch, in channels_last (4-d) or channels_last_3d (5-d) layout when asked."""
    fmt = channels_last_format(x) if channels_last else None
    if fmt is not None:
        return x.to(device, memory_format=fmt, non_blocking=True)
    return x.to(device, non_blocking=True)


def to_channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-d weights in channels_last and 5-d ones in channels_last_3d memory, in place: the
    layouts of `to_device`'s batches (Module.to takes one memory format, which fails on the other rank)."""

    def convert(t: Tensor) -> Tensor:
        fmt = channels_last_format(t)
        return t if fmt is None else t.contiguous(memory_format=fmt)

    return model._apply(convert)


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int, context: DistContext) -> DataLoader:
    """Loader over this rank's shard of `dataset` (per-rank batch = global batch / world size)."""
    return DataLoader(
        dataset,
        batch_size=max(batch_size // context.world_size, 1),
        sampler=ShardSampler(len(dataset), context.world_size, context.rank),  # type: ignore[arg-type]
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=context.device.type == "cuda",
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    context: DistContext,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, Any]:
    """Mean cross-entropy, top-1 and top-5 (%) over every rank's shard; skipped files are counted.

    Items of shape (K, C, T, H, W) are K clips of one video: their softmax scores are averaged
    before the loss and accuracy are taken.
    """
    was_training = model.training
    model.eval()
    device = context.device
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, top-1, top-5, samples, skipped
    skipped_paths: list[str] = []
    for batch in loader:
        skipped_paths.extend(batch["skipped"])
        totals[4] += len(batch["skipped"])
        if batch["input"] is None:
            continue
        x, target = batch["input"], batch["target"].to(device)
        clips = x.shape[1] if x.dim() == 6 else 1
        if x.dim() == 6:
            x = x.flatten(0, 1)  # (B, K, C, T, H, W) -> (B*K, C, T, H, W)
        with autocast(device, precision):
            logits = model(to_device(x, device, channels_last)).float()
        probs = logits.softmax(dim=1).view(-1, clips, logits.shape[1]).mean(dim=1)  # (B, classes)
        totals[0] += float(F.nll_loss(probs.clamp_min(1e-12).log(), target, reduction="sum"))
        top1, top5 = topk_correct(probs, target)
        totals[1] += top1
        totals[2] += top5
        totals[3] += target.shape[0]
    all_reduce_sum(context, totals)
    model.train(was_training)
    count = max(totals[3].item(), 1.0)
    return {
        "loss": totals[0].item() / count,
        "top1": 100.0 * totals[1].item() / count,
        "top5": 100.0 * totals[2].item() / count,
        "samples": int(totals[3].item()),
        "skipped": int(totals[4].item()),
        "skipped_paths": skipped_paths,
    }
