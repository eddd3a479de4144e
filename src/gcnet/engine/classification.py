"""Image and video classification as a task of the training loop: cross-entropy, top-1/top-5."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from gcnet.data.sampling import collate_skipping
from gcnet.engine.distributed import DistContext
from gcnet.engine.evaluate import autocast, evaluate, make_eval_loader, to_device
from gcnet.engine.metrics import topk_correct
from gcnet.engine.task import StepLoss, Task


class ClassificationTask(Task):
    """Cross-entropy on (B, C, H, W) images or (B, C, T, H, W) clips; multi-clip scores averaged at evaluation.

    Args:
        model: the classifier, on `device`.
        train_set, val_set, test_set: datasets of (input, label) items; val/test may be None.
        classes: class names in label order (saved with every checkpoint).
        device, precision, channels_last: where and how batches run.
        label_smoothing: cross-entropy label smoothing.
        eval_batch_size, workers: evaluation loader settings (global batch).
    """

    loss_terms = ()
    eval_fields = ("loss", "top1", "top5")
    score_name = "top1"

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None, test_set: Dataset | None,
                 classes: Sequence[str], device: torch.device, precision: str = "fp32",
                 channels_last: bool = False, label_smoothing: float = 0.0, eval_batch_size: int = 128,
                 workers: int = 0) -> None:
        self.model, self.train_set, self.classes = model, train_set, list(classes)
        self.splits = {"val": val_set, "test": test_set}
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.label_smoothing, self.eval_batch_size, self.workers = label_smoothing, eval_batch_size, workers

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        return collate_skipping(items)

    def skipped(self, batch: dict[str, Any]) -> list[str]:
        return list(batch["skipped"])

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepLoss | None:
        if batch["input"] is None:
            return None
        x = to_device(batch["input"], self.device, self.channels_last)
        target = batch["target"].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        correct = torch.tensor(topk_correct(logits.detach().float(), target, ks=(1,))[0], dtype=torch.float64)
        return StepLoss(loss, samples=int(target.shape[0]), correct=correct)

    def evaluate(self, model: nn.Module, split: str, context: DistContext, final: bool = False) -> dict[str, Any] | None:
        dataset = self.splits.get(split)
        if dataset is None:
            return None
        loader = make_eval_loader(dataset, self.eval_batch_size, self.workers, context)
        return evaluate(model, loader, context, self.precision, self.channels_last)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"classes": self.classes}
