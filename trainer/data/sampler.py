"""Which global samples each rank trains on at each step.

The position in the data is the number of samples consumed, not an iterator's state: step ``s`` of a run
with global batch ``B`` consumes samples ``[s*B, (s+1)*B)`` and rank ``r`` of ``W`` takes the ``r``-th
contiguous ``B/W`` slice. A run resumed at step ``s`` on any world size dividing ``B`` therefore sees exactly
the samples an uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import ConfigError


@dataclass(frozen=True)
class GlobalBatchSampler:
    global_batch_size: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.global_batch_size % self.world_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by the world size "
                f"{self.world_size}; allowed: a multiple of the number of workers"
            )

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def indices(self, step: int) -> list[int]:
        """Global sample indices this rank trains on at ``step`` (0-based)."""
        start = step * self.global_batch_size + self.rank * self.local_batch_size
        return list(range(start, start + self.local_batch_size))
