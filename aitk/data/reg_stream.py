"""Which regularisation samples each epoch mixes in (datasets with `is_reg: true`).

The reg pool is walked as an endless stream of seeded permutations, one per cycle through the
pool: each epoch takes the next `per_epoch` entries (as many as the epoch's non-reg samples), so a
large reg set is subsampled and used evenly over the epochs, and a small one is cycled.
"""

from __future__ import annotations

import numpy as np

_REG_STREAM = 0x726567  # separates the regularisation-selection generator from the others


class RegStream:
    def __init__(self, seed: int, pool: list[int], per_epoch: int) -> None:
        self._seed = seed
        self._pool = pool  # item indices of the is_reg datasets (num_repeats expanded)
        self._per_epoch = per_epoch
        self._perms: dict[int, np.ndarray] = {}  # a few recent cycles' permutations
        self._last: tuple[int, list[int]] | None = None  # (epoch, its items): asked for per sample

    def _perm(self, cycle: int) -> np.ndarray:
        perm = self._perms.get(cycle)
        if perm is None:
            if len(self._perms) > 8:
                self._perms.clear()
            perm = np.random.default_rng([self._seed, _REG_STREAM, int(cycle)]).permutation(len(self._pool))
            self._perms[cycle] = perm
        return perm

    def items(self, epoch: int) -> list[int]:
        """The item indices of `epoch`'s regularisation samples, in order."""
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        n, m = self._per_epoch, len(self._pool)
        out = []
        for p in range(epoch * n, (epoch + 1) * n):
            cycle, offset = divmod(p, m)
            out.append(self._pool[int(self._perm(cycle)[offset])])
        self._last = (epoch, out)
        return out
