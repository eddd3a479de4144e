"""Global batches, their split over processes and accumulation steps, and resuming inside an epoch."""

import pytest

from gcnet.data.sampling import MicroBatchSampler, epoch_batches


def test_epoch_batches_are_a_seeded_permutation_in_full_batches() -> None:
    batches = epoch_batches(26, 8, seed=7, epoch=0)
    assert [len(b) for b in batches] == [8, 8, 8]
    assert len({i for b in batches for i in b}) == 24
    assert batches == epoch_batches(26, 8, seed=7, epoch=0)
    assert batches != epoch_batches(26, 8, seed=7, epoch=1)


def test_grouped_batches_come_from_one_group_until_the_leftovers() -> None:
    groups = [0, 1] * 10 + [0]  # 11 of group 0, 10 of group 1
    batches = epoch_batches(21, 4, seed=1, epoch=0, groups=groups)
    assert len(batches) == 2 + 2 + 1  # 8 + 8 grouped, 3 + 2 left over make one mixed batch of 4
    assert all(len({groups[i] for i in b}) == 1 for b in batches[:4])
    assert all(len(b) == 4 for b in batches)
    with pytest.raises(ValueError, match="groups has 3 entries for 21"):
        epoch_batches(21, 4, seed=1, epoch=0, groups=[0, 1, 0])


@pytest.mark.parametrize("groups", [None, [i % 3 for i in range(40)]])
def test_two_processes_see_the_micro_batches_of_one_process_accumulating_two(groups: list[int] | None) -> None:
    single = list(MicroBatchSampler(40, 8, world_size=1, rank=0, accumulation=2, seed=3, groups=groups))
    ranks = [list(MicroBatchSampler(40, 8, world_size=2, rank=r, accumulation=1, seed=3, groups=groups))
             for r in (0, 1)]
    assert len(single) == 10 and len(ranks[0]) == len(ranks[1]) == 5
    for step in range(5):
        assert single[2 * step] == ranks[0][step] and single[2 * step + 1] == ranks[1][step]
    whole = epoch_batches(40, 8, seed=3, epoch=0, groups=groups)
    assert [sorted(single[2 * k] + single[2 * k + 1]) for k in range(5)] == [sorted(b) for b in whole]


def test_resuming_skips_the_steps_already_taken() -> None:
    sampler = MicroBatchSampler(40, 8, world_size=1, rank=0, accumulation=1, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_step=3)
    assert list(sampler) == full[3:] and len(sampler) == 2
    with pytest.raises(ValueError, match="does not split into 3 processes x 1"):
        MicroBatchSampler(40, 8, world_size=3, rank=0, accumulation=1, seed=3)
