"""Deterministic mini-batch order."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BatchSchedule"]


class BatchSchedule:
    """Stateless, seeded batch order: the indices of any step can be recomputed.

    Each epoch is a permutation drawn from (seed, epoch); the last partial batch
    of an epoch is dropped. Both arms use the same schedule, so they see the same
    examples in the same order; resuming needs no RNG state.
    """

    def __init__(self, n: int, batch_size: int, seeds: list[int]):
        self.n, self.b, self.seeds = n, batch_size, seeds
        self.per_epoch = n // batch_size
        self._epoch, self._perms = -1, None

    def indices(self, step: int) -> Tensor:
        """(batch_size, S) example indices of ``step`` for every seed."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._perms = torch.stack(
                [
                    torch.randperm(
                        self.n, generator=torch.Generator().manual_seed(1_000_003 * s + epoch)
                    )
                    for s in self.seeds
                ]
            )
            self._epoch = epoch
        return self._perms[:, pos * self.b : (pos + 1) * self.b].t().contiguous()
