"""Bucket-aware, deterministic, resumable, shardable batch sampler.

Each epoch: the sample indices of every bucket are shuffled by a generator seeded with
(seed, epoch), cut into batches of `batch_size` inside the bucket (a bucket's last partial batch is
kept), and the batch order is shuffled. With N processes the epoch's batch list is truncated to a
multiple of N and rank r takes batches r, r+N, r+2N, ... so ranks see disjoint samples and the same
number of batches. The whole epoch is a pure function of (seed, epoch), so resuming needs only
{epoch, position}.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import numpy as np


def seed_words(seed: int) -> int:
    """Map any Python int seed onto the non-negative range numpy's SeedSequence accepts."""
    return int(seed) % (1 << 64)


class BucketBatchSampler:
    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.batch_size = int(batch_size)
        self.seed = seed_words(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(bucket_keys):  # insertion order: deterministic for a given input
            groups.setdefault(key, []).append(index)
        self._groups = [np.asarray(v, dtype=np.int64) for v in groups.values()]
        self.bucket_keys = list(groups.keys())
        total = sum(-(-len(g) // self.batch_size) for g in self._groups)
        self.total_batches = total  # all ranks together, before truncation
        self._per_rank = total // self.world_size
        self.epoch = 0
        self.position = 0
        self._cached_epoch: int | None = None
        self._cached_batches: list[list[int]] = []

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self._per_rank

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of an epoch in order, all ranks together (after truncation to a multiple of N)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches: list[list[int]] = []
        for group in self._groups:
            shuffled = rng.permutation(group)
            for start in range(0, len(shuffled), self.batch_size):
                batches.append([int(i) for i in shuffled[start : start + self.batch_size]])
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        return batches[: self._per_rank * self.world_size]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch."""
        if self._cached_epoch != epoch:
            self._cached_batches = self.all_batches(epoch)[self.rank :: self.world_size]
            self._cached_epoch = epoch
        return self._cached_batches

    def next(self) -> tuple[int, list[int]]:
        """(epoch, indices) of the next batch; epochs advance by themselves."""
        if self._per_rank == 0:
            raise RuntimeError("the sampler has no batches (fewer batches than processes)")
        if self.position >= self._per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        batch = self.epoch_batches(epoch)[self.position]
        self.position += 1
        if self.position >= self._per_rank:  # advance eagerly so `epoch` reads as the next one
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
        if self._per_rank and position >= self._per_rank:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
