"""What a task gives the training loop: its batches, its loss step and its evaluation.

The loop (`gcnet.engine.loop`) owns everything else: sampling, accumulation, DDP, precision,
clipping, schedules, checkpoints, logs. Classification (images and clips) and detection are tasks.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from gcnet.engine.distributed import DistContext


@dataclass
class StepLoss:
    """One micro-batch's loss and what the logs show of it.

    Args:
        loss: the scalar to differentiate (a mean over the micro-batch).
        terms: named parts of the loss (detection's RPN, box, mask terms), logged per step.
        correct: top-1 hits in the micro-batch, where the task has them.
        samples: samples in the micro-batch.
    """

    loss: Tensor
    samples: int
    terms: dict[str, Tensor] = field(default_factory=dict)
    correct: Tensor | None = None


class Task(abc.ABC):
    """A training task; subclasses set the attributes and implement the methods.

    Attributes:
        model: the network, on its device.
        train_set: the training dataset (the loop seeds its random transforms per sample).
        splits: evaluation datasets by name ("val", "test"); None where not configured.
        groups: a group id per training sample that batches should not mix (aspect ratios), or None.
        loss_terms: names of `StepLoss.terms`, the columns of steps.csv after "loss".
        eval_fields: names of the metrics of `evaluate`, the columns of metrics.csv after "val_".
        score_name: the metric that picks the best checkpoint (higher is better).
    """

    model: nn.Module
    train_set: Dataset
    splits: dict[str, Dataset | None]
    groups: Sequence[int] | None = None
    loss_terms: tuple[str, ...] = ()
    eval_fields: tuple[str, ...] = ()
    score_name: str = ""

    @abc.abstractmethod
    def collate(self, items: Sequence[Any]) -> Any:
        """A micro-batch from dataset items (corrupt items reported, not collated)."""

    @abc.abstractmethod
    def skipped(self, batch: Any) -> list[str]:
        """Paths or ids of the corrupt items left out of `batch`."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> StepLoss | None:
        """Forward `batch` in training mode and return its loss; None when every item was skipped."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str, context: DistContext, final: bool = False) -> dict[str, Any] | None:
        """Metrics of `model` on "val" or "test" on every rank (None when the split is not configured)."""

    def has_split(self, split: str) -> bool:
        """Whether "val" / "test" data is configured."""
        return self.splits.get(split) is not None

    def checkpoint_state(self) -> dict[str, Any]:
        """Plain data saved in every checkpoint to rebuild and evaluate the model (class names, label maps)."""
        return {}

    def finish(self, out_dir: Path, title: str) -> None:
        """Task-specific outputs at the end of a run on rank 0 (pictures, loss curves)."""
