"""BucketBatchSampler: one bucket per batch, no data dropped, determinism, resume, sharding."""

from collections import Counter

import pytest

from aitk.data.sampler import BucketBatchSampler

KEYS = ["a"] * 7 + ["b"] * 3 + ["c"] * 1 + ["d"] * 10  # 21 samples in 4 buckets


def take(s: BucketBatchSampler, n: int):
    return [s.next() for _ in range(n)]


def test_batches_single_bucket_and_cover_epoch():
    s = BucketBatchSampler(KEYS, batch_size=4, seed=3)
    assert len(s) == 2 + 1 + 1 + 3
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        assert len(batches) == len(s)
        for b in batches:
            assert len({KEYS[i] for i in b}) == 1
            assert 1 <= len(b) <= 4
        seen = Counter(i for b in batches for i in b)
        assert sorted(seen) == list(range(len(KEYS))) and set(seen.values()) == {1}  # nothing dropped
    assert s.epoch_batches(0) != s.epoch_batches(1)  # reshuffled per epoch


def test_deterministic_across_instances_and_seed_dependent():
    a = take(BucketBatchSampler(KEYS, 2, seed=7), 30)
    b = take(BucketBatchSampler(KEYS, 2, seed=7), 30)
    c = take(BucketBatchSampler(KEYS, 2, seed=8), 30)
    assert a == b and a != c


@pytest.mark.parametrize("k", [0, 1, 5, 7, 8, 13])
def test_resume(k):
    full = BucketBatchSampler(KEYS, 4, seed=1)
    expected = take(full, 25)
    first = BucketBatchSampler(KEYS, 4, seed=1)
    got = take(first, k)
    state = first.state_dict()
    assert set(state) == {"epoch", "position"}
    second = BucketBatchSampler(KEYS, 4, seed=1)
    second.load_state_dict(dict(state))
    got += take(second, 25 - k)
    assert got == expected


def test_epoch_advances_after_last_batch():
    s = BucketBatchSampler(KEYS, 4, seed=0)
    for _ in range(len(s)):
        epoch, _ = s.next()
        assert epoch == 0
    assert s.epoch == 1 and s.position == 0
    assert s.next()[0] == 1


@pytest.mark.parametrize("world", [2, 3])
def test_sharding_disjoint_equal_counts(world):
    ranks = [BucketBatchSampler(KEYS, 2, seed=5, rank=r, world_size=world) for r in range(world)]
    total = BucketBatchSampler(KEYS, 2, seed=5).total_batches
    assert all(len(r) == total // world for r in ranks)
    for epoch in range(3):
        per_rank = [[i for b in r.epoch_batches(epoch) for i in b] for r in ranks]
        flat = [i for p in per_rank for i in p]
        assert len(flat) == len(set(flat))  # disjoint
        single = BucketBatchSampler(KEYS, 2, seed=5)
        assert set(flat) <= set(range(len(KEYS)))
        assert len(single.all_batches(epoch)) == total  # world 1 keeps every batch
    # rank r takes r, r+N, ... of the common list
    common = ranks[0].all_batches(0)
    assert ranks[1].epoch_batches(0) == common[1::world]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        BucketBatchSampler(KEYS, 0, seed=0)
    with pytest.raises(ValueError):
        BucketBatchSampler(KEYS, 1, seed=0, rank=2, world_size=2)
    BucketBatchSampler(KEYS, 1, seed=-5).next()  # negative seeds are fine
