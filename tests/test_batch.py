"""Length-bucketed micro-batches (step/batch.py: length_bucketed) against exact enumeration."""

import itertools
import random

import pytest
import torch

from megatron_rpg.step.batch import MICRO_BATCH_COST_SLOTS, length_bucketed


def cost(lengths, micros):
    """Token slots (rows x the longest row) plus the fixed cost of each micro-batch."""
    return sum(len(m) * int(lengths[m].max()) + MICRO_BATCH_COST_SLOTS for m in micros)


def partitions(items, most):
    """Every set partition of `items` into blocks of at most `most` (exact enumeration)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in range(min(most, len(items))):
        for mates in itertools.combinations(rest, others):
            remaining = [i for i in rest if i not in mates]
            for tail in partitions(remaining, most):
                yield [[first, *mates], *tail]


@pytest.mark.parametrize("seed", range(12))
def test_cuts_cost_the_least_of_every_partition(seed):
    rng = random.Random(seed)
    count, most = rng.randint(1, 8), rng.randint(1, 4)
    lengths = torch.tensor([rng.choice([3, 20, 60, 64, 100, 150, 170]) for _ in range(count)])
    micros = length_bucketed(lengths, most)
    best = min(
        cost(lengths, [torch.tensor(b) for b in p]) for p in partitions(list(range(count)), most)
    )
    assert cost(lengths, micros) == best
    assert sorted(torch.cat(micros).tolist()) == list(range(count))
    assert all(1 <= len(m) <= most for m in micros)


@pytest.mark.parametrize("seed", range(10))
def test_cuts_for_a_pipeline_cost_the_least_of_the_partitions_into_enough_micro_batches(seed):
    """fewest=2P: the cheapest of every partition with at least min(2P, rows) blocks."""
    rng = random.Random(100 + seed)
    count, most, fewest = rng.randint(1, 8), rng.randint(1, 4), rng.choice([2, 4, 8])
    lengths = torch.tensor([rng.choice([3, 20, 60, 64, 100, 150, 170]) for _ in range(count)])
    micros = length_bucketed(lengths, most, fewest=fewest)
    allowed = [p for p in partitions(list(range(count)), most) if len(p) >= min(fewest, count)]
    best = min(cost(lengths, [torch.tensor(b) for b in p]) for p in allowed)
    assert cost(lengths, micros) == best
    assert len(micros) >= min(fewest, count)
    assert sorted(torch.cat(micros).tolist()) == list(range(count))
    assert all(1 <= len(m) <= most for m in micros)


def test_a_pipeline_splits_an_even_bucket_it_would_keep_whole():
    assert [len(m) for m in length_bucketed(torch.full((8,), 100), 8, fewest=4)] == [2, 2, 2, 2]
    assert len(length_bucketed(torch.full((3,), 100), 8, fewest=4)) == 3  # one row each


def test_a_bucket_is_cut_where_lengths_fall_and_kept_whole_where_they_do_not():
    even = length_bucketed(torch.full((8,), 100), 8)
    assert [len(m) for m in even] == [8]  # one micro-batch: cutting would only add its cost
    steps = length_bucketed(torch.tensor([170] * 4 + [40] * 4), 8)
    assert [len(m) for m in steps] == [4, 4]  # 840 slots + 2 costs against 1360 + 1


@pytest.mark.parametrize("data_parallel", [1, 2, 3])
def test_every_sequence_lands_once_over_the_data_parallel_ranks(data_parallel):
    lengths = torch.randint(5, 200, (23,), generator=torch.Generator().manual_seed(0))
    rows = [
        r
        for rank in range(data_parallel)
        for m in length_bucketed(lengths, 4, rank, data_parallel)
        for r in m.tolist()
    ]
    assert sorted(rows) == list(range(23))
