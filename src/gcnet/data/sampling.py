"""Reproducible batches: seeded shuffling shared by every rank, per-sample augmentation seeds, resumable.

The random crop of sample i in epoch e depends only on (seed, e, i), not on the worker, the rank or
whether the run was resumed; that is what makes `--resume` and torchrun reproduce a single run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, default_collate

from gcnet.data.errors import Skipped


def epoch_batches(
    length: int, batch_size: int, seed: int, epoch: int, groups: Sequence[int] | None = None
) -> list[list[int]]:
    """The global batches of one epoch: a permutation seeded by (seed + epoch) cut into full batches.

    With `groups` (e.g. aspect-ratio bins), each batch is filled from one group as its indices come
    up, and what the groups leave over forms mixed batches at the end; an incomplete last batch is
    dropped, so every batch splits evenly over processes.
    """
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if groups is None:
        return [order[i : i + batch_size] for i in range(0, length - batch_size + 1, batch_size)]
    if len(groups) != length:
        raise ValueError(f"groups has {len(groups)} entries for {length} samples")
    batches: list[list[int]] = []
    buffers: dict[int, list[int]] = {}
    for index in order:
        buffer = buffers.setdefault(groups[index], [])
        buffer.append(index)
        if len(buffer) == batch_size:
            batches.append(list(buffer))
            buffer.clear()
    rest = [index for group in sorted(buffers) for index in buffers[group]]
    return batches + [rest[i : i + batch_size] for i in range(0, len(rest) - batch_size + 1, batch_size)]


class MicroBatchSampler(Sampler[list[int]]):
    """This process's micro-batches of every global batch, resumable at any step of an epoch.

    Global batch k is split into `world_size * accumulation` micro-batches; micro-batch g takes
    positions g, g + W*A, g + 2*W*A, ... of it, and process r runs g = m * W + r for m < A. So one
    process with A = 2 sees exactly the micro-batches that two processes with A = 1 see, and a
    micro-batch's samples do not depend on how the work is spread.

    Args:
        length: samples in the dataset.
        batch_size: global batch; must split into world_size * accumulation equal parts.
        world_size, rank: processes and this one's rank.
        accumulation: micro-batches per process per optimizer step.
        seed: base seed of the per-epoch shuffle.
        groups: group id per sample for `epoch_batches`, or None.
    """

    def __init__(self, length: int, batch_size: int, world_size: int, rank: int, accumulation: int, seed: int,
                 groups: Sequence[int] | None = None) -> None:
        parts = world_size * accumulation
        if batch_size % parts:
            raise ValueError(f"the global batch of {batch_size} does not split into {world_size} processes x "
                             f"{accumulation} accumulation steps")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.world_size, self.rank, self.accumulation = world_size, rank, accumulation
        self.groups = list(groups) if groups is not None else None
        self.epoch, self.start = 0, 0
        self.steps = len(epoch_batches(length, batch_size, seed, 0, self.groups))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the shuffle of `epoch` and skip its first `start_step` global batches (resuming)."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.epoch, self.start = epoch, start_step

    def __iter__(self) -> Iterator[list[int]]:
        parts = self.world_size * self.accumulation
        for batch in epoch_batches(self.length, self.batch_size, self.seed, self.epoch, self.groups)[self.start :]:
            for m in range(self.accumulation):
                yield batch[m * self.world_size + self.rank :: parts]

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.accumulation


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
