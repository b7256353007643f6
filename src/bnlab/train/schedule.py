"""Deterministic mini-batch order."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SHUFFLES", "BatchSchedule"]

SHUFFLES = ("epoch", "shard")


class BatchSchedule:
    """Stateless, seeded batch order: the indices of any step can be recomputed.

    ``shuffle="epoch"``: each epoch is a fresh permutation of the whole set drawn
    from (seed, epoch). ``shuffle="shard"``: the set is cut once (per seed) into
    ``shards`` fixed shards, visited in the same order every epoch, and only the
    examples within a shard are reshuffled each epoch; this is the less thorough
    shuffling that Section 4.2.1 replaces ("shuffle training examples more
    thoroughly"). The last partial batch of an epoch is dropped. Arms with the
    same seeds see the same examples in the same order; resuming needs no RNG state.
    """

    def __init__(
        self, n: int, batch_size: int, seeds: list[int], shuffle: str = "epoch", shards: int = 10
    ):
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
        self.n, self.b, self.seeds = n, batch_size, seeds
        self.shuffle, self.shards = shuffle, max(1, min(shards, n))
        self.per_epoch = n // batch_size
        self._epoch, self._perms = -1, None

    def _perm(self, seed: int, epoch: int) -> Tensor:
        if self.shuffle == "epoch":
            return torch.randperm(
                self.n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch)
            )
        # Fixed shards from one permutation of the seed; within-shard order per epoch.
        base = torch.randperm(self.n, generator=torch.Generator().manual_seed(7_919 * seed + 1))
        gen = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        parts = torch.tensor_split(base, self.shards)
        return torch.cat([p[torch.randperm(len(p), generator=gen)] for p in parts])

    def indices(self, step: int) -> Tensor:
        """(batch_size, S) example indices of ``step`` for every seed."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._perms = torch.stack([self._perm(s, epoch) for s in self.seeds])
            self._epoch = epoch
        return self._perms[:, pos * self.b : (pos + 1) * self.b].t().contiguous()
