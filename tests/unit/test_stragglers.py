"""Straggler bookkeeping on heartbeats (no Ray, no training): a rank is flagged only when its compute time is
past both the factor and the floor above the median, and excluded after consecutive flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.cluster.health_watch import HealthWatch
from trainer.cluster.watch import ChunkOutcome
from trainer.errors import ConfigError
from trainer.goodput import Goodput
from trainer.journal import Journal
from trainer.metrics import NullSink
from trainer.policy import FailureKind
from trainer.testing.configs import TINY_CPU, make_config


def _chunk(compute_s: dict[int, float]) -> ChunkOutcome:
    return ChunkOutcome(
        results={
            rank: {"ok": True, "step": 3, "step_times": [t] * 3, "compute_times": [t] * 3}
            for rank, t in compute_s.items()
        }
    )


def _watch(tmp_path: Path, *overrides: str) -> tuple[HealthWatch, Journal]:
    config = make_config(*TINY_CPU, "fault_tolerance.straggler_strikes=2", *overrides)
    journal = Journal(tmp_path / "journal.jsonl")
    return HealthWatch(config, journal, NullSink(), Goodput()), journal


def test_jitter_of_a_millisecond_on_short_steps_is_not_a_straggler(tmp_path: Path) -> None:
    watch, journal = _watch(tmp_path)
    # 1.5x the median, but 1 ms above it: a shared host's scheduling, not a slow device.
    for step in (3, 6, 9):
        assert watch._stragglers("cpu", step, _chunk({0: 0.002, 1: 0.003, 2: 0.002})) is None
    assert not [e for e in journal.read() if e["event"] == "straggler_flagged"]


def test_a_rank_past_factor_and_floor_is_flagged_then_excluded(tmp_path: Path) -> None:
    watch, journal = _watch(tmp_path)
    slow = {0: 0.002, 1: 0.05, 2: 0.002}
    assert watch._stragglers("cpu", 3, _chunk(slow)) is None
    finding = watch._stragglers("cpu", 6, _chunk(slow))
    assert finding is not None and finding[0] is FailureKind.STRAGGLER and finding[1] == (1,)
    flagged = [e for e in journal.read() if e["event"] == "straggler_flagged"]
    assert [(e["rank"], e["strikes"], e["floor_s"]) for e in flagged] == [(1, 1, 0.01), (1, 2, 0.01)]


def test_a_zero_floor_leaves_the_factor_alone_to_decide(tmp_path: Path) -> None:
    watch, _ = _watch(tmp_path, "fault_tolerance.straggler_floor_s=0")
    jitter = {0: 0.002, 1: 0.003, 2: 0.002}
    assert watch._stragglers("cpu", 3, _chunk(jitter)) is None
    assert watch._stragglers("cpu", 6, _chunk(jitter)) == (
        FailureKind.STRAGGLER,
        (1,),
        "compute time > 1.4 x median (and >= 0.0 s above it) in consecutive chunks",
    )


def test_a_negative_floor_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"fault_tolerance\.straggler_floor_s"):
        make_config(*TINY_CPU, "fault_tolerance.straggler_floor_s=-1")
