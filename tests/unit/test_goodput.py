"""Goodput accounting: productive time / wall time, badput buckets, and continuation after a restart."""

from __future__ import annotations

import pytest

from trainer.goodput import BUCKETS, Goodput


def test_snapshot_splits_wall_time_into_productive_badput_and_other() -> None:
    g = Goodput(now=1000.0)
    g.productive(8.0)
    g.bad("checkpoint", 0.5)
    g.bad("recovery", 0.5)
    totals = g.snapshot(now=1010.0)
    assert totals["wall_s"] == pytest.approx(10.0)
    assert totals["ratio"] == pytest.approx(0.8)
    assert totals["badput_s"]["other"] == pytest.approx(1.0)
    assert set(totals["badput_s"]) == set(BUCKETS)


def test_unknown_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="goodput bucket 'coffee'; allowed: startup"):
        Goodput().bad("coffee", 1.0)


def test_a_relaunched_driver_continues_the_account() -> None:
    previous = [
        {
            "time": 100.0,
            "event": "goodput",
            "wall_s": 50.0,
            "productive_s": 40.0,
            "badput_s": {"startup": 5.0, "checkpoint": 1.0, "other": 4.0},
        },
        {"time": 110.0, "event": "heartbeat", "busy_s": 8.0},  # trained after the last account: redone
        {"time": 112.0, "event": "heartbeat", "busy_s": 1.5},
    ]
    g = Goodput(now=120.0)
    g.resume_from(previous, now=120.0)
    totals = g.snapshot(now=120.0)
    assert totals["wall_s"] == pytest.approx(70.0)  # 50 accounted + 12 until the crash + 8 down
    assert totals["productive_s"] == pytest.approx(40.0)
    assert totals["badput_s"]["startup"] == pytest.approx(5.0)
    assert totals["badput_s"]["lost_work"] == pytest.approx(9.5)
    assert totals["badput_s"]["restart"] == pytest.approx(8.0)  # 112 → 120: no driver running
    assert totals["ratio"] == pytest.approx(40.0 / 70.0)


def test_nothing_to_resume_from_leaves_a_fresh_account() -> None:
    g = Goodput(now=0.0)
    g.resume_from([{"time": 1.0, "event": "run_started"}], now=5.0)
    assert g.snapshot(now=0.0)["wall_s"] == 0.0
