"""Which global samples each rank trains on at each step.

The position in the data is the number of samples consumed, not an iterator's state: step ``s`` of a run
with global batch ``B`` consumes samples ``[s*B, (s+1)*B)`` and rank ``r`` of ``W`` takes the ``r``-th
contiguous slice of them. When ``W`` does not divide ``B`` the slices differ by one sample (the first
``B mod W`` ranks take one more), and each rank's loss is weighted by its :attr:`~GlobalBatchSampler.share` so
that the averaged gradient is the mean over the global batch, as on one process. A run resumed at step ``s``
on any world size up to ``B`` therefore sees exactly the samples, and makes the update, an uninterrupted run
would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from trainer.errors import ConfigError


@dataclass(frozen=True)
class GlobalBatchSampler:
    global_batch_size: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.global_batch_size < self.world_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is smaller than the world size "
                f"{self.world_size}; allowed: at least one sample per rank"
            )

    @property
    def local_batch_size(self) -> int:
        return split(self.global_batch_size, self.world_size)[self.rank]

    @property
    def offset(self) -> int:
        """Where this rank's slice starts within a global batch."""
        return sum(split(self.global_batch_size, self.world_size)[: self.rank])

    @property
    def share(self) -> Fraction:
        """This rank's samples against an even split: the weight of its (mean) loss in the gradient average.
        The gradient averaged over ``W`` ranks is then ``sum(n_r * mean_r) / B``, the global batch's mean."""
        return Fraction(self.local_batch_size * self.world_size, self.global_batch_size)

    def indices(self, step: int) -> list[int]:
        """Global sample indices this rank trains on at ``step`` (0-based)."""
        start = step * self.global_batch_size + self.offset
        return list(range(start, start + self.local_batch_size))


def split(count: int, parts: int) -> list[int]:
    """``count`` items into ``parts`` contiguous parts whose sizes differ by at most one (larger first)."""
    base, extra = divmod(count, parts)
    return [base + (i < extra) for i in range(parts)]
