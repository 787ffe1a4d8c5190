"""A Ray group's chunk length: ``cluster.chunk_steps`` steps, or with ``cluster.chunk_s`` as many as fill it at
the median step time measured so far, never fewer than ``chunk_steps``."""

from __future__ import annotations

import pytest

from trainer.cluster.deadlines import Deadlines
from trainer.config import ClusterConfig, FaultToleranceConfig


@pytest.mark.parametrize(
    ("chunk_steps", "chunk_s", "median_step_s", "expected"),
    [
        (5, 0.0, 0.026, 5),  # no chunk_s: steps as configured
        (5, 1.0, None, 5),  # nothing measured yet
        (5, 1.0, 0.026, 38),  # 1 s of 26 ms steps
        (10, 1.0, 0.5, 10),  # never fewer than chunk_steps
        (1, 0.25, 0.1, 2),  # whole steps only
    ],
)
def test_steps_per_chunk(
    chunk_steps: int, chunk_s: float, median_step_s: float | None, expected: int
) -> None:
    deadlines = Deadlines(ClusterConfig(chunk_steps=chunk_steps, chunk_s=chunk_s), FaultToleranceConfig())
    if median_step_s is not None:
        deadlines.record([median_step_s])
    assert deadlines.chunk_steps() == expected
