"""Bucket-aware, deterministic, resumable, shardable batch sampler.

Each epoch: the sample indices of every bucket are shuffled by a generator seeded with
(seed, epoch), cut into batches of `batch_size` inside the bucket (a bucket's last partial batch is
kept), and the batch order is shuffled. With N processes the epoch's batch list is truncated to a
multiple of N and rank r takes batches r, r+N, r+2N, ... so ranks see disjoint samples and the same
number of batches. The whole epoch is a pure function of (seed, epoch), so resuming needs only
{epoch, position}.

`extra_keys(epoch)` adds samples that change from epoch to epoch (regularisation images): their
indices follow the fixed ones (len(bucket_keys), len(bucket_keys) + 1, ...) and they share buckets
with the fixed samples. The number of batches can then differ between epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np


def seed_words(seed: int) -> int:
    """Map any Python int seed onto the non-negative range numpy's SeedSequence accepts."""
    return int(seed) % (1 << 64)


def _group(keys: Sequence[Hashable]) -> list[np.ndarray]:
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):  # insertion order: deterministic for a given input
        groups.setdefault(key, []).append(index)
    return [np.asarray(v, dtype=np.int64) for v in groups.values()]


class BucketBatchSampler:
    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        extra_keys: Callable[[int], Sequence[Hashable]] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.batch_size = int(batch_size)
        self.seed = seed_words(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._keys = list(bucket_keys)
        self._extra = extra_keys
        self._groups = _group(self._keys)
        self.bucket_keys = list(dict.fromkeys(self._keys))
        self.total_batches = self.total_batches_in(0)  # all ranks together, before truncation
        self._per_rank = self.total_batches // self.world_size
        self.epoch = 0
        self.position = 0
        self._cached_epoch: int | None = None
        self._cached_all: list[list[int]] = []
        self._cached_batches: list[list[int]] = []

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        if self._extra is None:
            return self._groups
        return _group(self._keys + list(self._extra(int(epoch))))

    def total_batches_in(self, epoch: int) -> int:
        """Batches of an epoch, all ranks together, before truncation to a multiple of N."""
        return sum(-(-len(g) // self.batch_size) for g in self._epoch_groups(epoch))

    def batches_in_epoch(self, epoch: int) -> int:
        """This rank's number of batches in an epoch."""
        if self._extra is None:
            return self._per_rank
        return len(self.epoch_batches(epoch))

    def __len__(self) -> int:
        """Batches per epoch for this rank (of the current epoch when it varies)."""
        return self.batches_in_epoch(self.epoch)

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of an epoch in order, all ranks together (after truncation to a multiple of N)."""
        if self._cached_epoch == epoch:
            return self._cached_all
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches: list[list[int]] = []
        for group in self._epoch_groups(epoch):
            shuffled = rng.permutation(group)
            for start in range(0, len(shuffled), self.batch_size):
                batches.append([int(i) for i in shuffled[start : start + self.batch_size]])
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        return batches[: len(batches) // self.world_size * self.world_size]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch."""
        if self._cached_epoch != epoch:
            everything = self.all_batches(epoch)
            self._cached_all = everything
            self._cached_batches = everything[self.rank :: self.world_size]
            self._cached_epoch = epoch
        return self._cached_batches

    def next(self) -> tuple[int, list[int]]:
        """(epoch, indices) of the next batch; epochs advance by themselves."""
        if self._extra is None and self._per_rank == 0:
            raise RuntimeError("the sampler has no batches (fewer batches than processes)")
        for _ in range(1000):  # an epoch can only be empty for this rank when it varies
            if self.position < self.batches_in_epoch(self.epoch):
                break
            self.epoch, self.position = self.epoch + 1, 0
        else:
            raise RuntimeError("the sampler has no batches (fewer batches than processes)")
        epoch = self.epoch
        batch = self.epoch_batches(epoch)[self.position]
        self.position += 1
        if self.position >= self.batches_in_epoch(epoch):  # advance eagerly so `epoch` reads as the next one
            self.epoch, self.position = self.epoch + 1, 0
        return epoch, list(batch)

    def __iter__(self) -> Iterator[list[int]]:
        """Endless iteration from the current position."""
        while True:
            yield self.next()[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state.get("epoch", 0)), int(state.get("position", 0))
        if epoch < 0 or position < 0:
            raise ValueError(f"invalid sampler state {state!r}")
        per_epoch = self.batches_in_epoch(epoch)
        if per_epoch and position >= per_epoch:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
