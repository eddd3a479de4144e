"""Reproducible batches: seeded shuffling shared by every rank, per-sample augmentation seeds, resumable.

The random crop of sample i in epoch e depends only on (seed, e, i), not on the worker, the rank or
whether the run was resumed; that is what makes `--resume` and torchrun reproduce a single run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, default_collate

from gcnet.data.errors import Skipped


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` (same order for world size 1) that can start part-way into an epoch.

    Rank r takes positions r, r + W, r + 2W, ... of the seeded permutation, so batch k of W ranks
    with per-rank batch b holds exactly the samples of batch k of one process with batch W * b.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` indices of this rank in the current epoch (resuming mid-epoch)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation order: rank r takes indices r, r + W, ... with no padding, so every sample counts once."""

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededDataset(Dataset):
    """Wraps a dataset so the random transforms of item i in epoch e are seeded by (seed, e, i).

    The global torch RNG of the calling process is restored afterwards, so loading data never
    changes the random stream the model sees.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # Large odd multipliers keep (seed, epoch, index) triples from colliding.
        item_seed = (self.seed * 1_000_003 + self.epoch * 998_244_353 + index * 2_654_435_761) % (2**63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            return self.dataset[index]


def collate_skipping(batch: Sequence[Any]) -> dict[str, Any]:
    """Collate (input, label) pairs, dropping `Skipped` markers and listing their paths.

    Returns {"input": Tensor | None, "target": Tensor | None, "skipped": [paths]}; input is None when
    every item of the batch was skipped.
    """
    kept = [item for item in batch if not isinstance(item, Skipped)]
    skipped = [item.path for item in batch if isinstance(item, Skipped)]
    if not kept:
        return {"input": None, "target": None, "skipped": skipped}
    inputs, targets = default_collate(kept)
    return {"input": inputs, "target": targets, "skipped": skipped}


def batch_size_of(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (0 when all were skipped)."""
    value: Tensor | None = batch["input"]
    return 0 if value is None else int(value.shape[0])
