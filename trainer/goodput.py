"""Effective training time: productive step time ÷ wall time, with the rest in named badput buckets.

Productive time is the step time of steps whose results were kept. Everything else the driver can name
goes to a bucket — start-up (workers, restore), checkpoint blocking, probes, recovery, hand-over, lost
work (chunks that failed), driver restarts (the gap while no driver ran) — and the remainder to ``other``.
The totals are journalled with every checkpoint, so a re-launched driver continues the account: the
time between the previous driver's last entry and this start counts as ``restart``, and the previous
session's work after its last committed checkpoint, which is done again, as ``lost_work``.
"""

from __future__ import annotations

import time
from typing import Any

BUCKETS = ("startup", "checkpoint", "probe", "recovery", "handover", "lost_work", "restart", "other")


class Goodput:
    def __init__(self, now: float | None = None) -> None:
        self.session_start = time.time() if now is None else now
        self.previous_wall_s = 0.0
        self.productive_s = 0.0
        self.badput_s: dict[str, float] = dict.fromkeys(BUCKETS, 0.0)

    def productive(self, seconds: float) -> None:
        self.productive_s += seconds

    def bad(self, bucket: str, seconds: float) -> None:
        if bucket not in self.badput_s:
            raise ValueError(f"goodput bucket {bucket!r}; allowed: {', '.join(BUCKETS)}")
        self.badput_s[bucket] += max(0.0, seconds)

    def wall_s(self, now: float | None = None) -> float:
        return self.previous_wall_s + ((time.time() if now is None else now) - self.session_start)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Totals so far, with ``other`` = wall time nobody accounted for."""
        wall = self.wall_s(now)
        named = sum(v for k, v in self.badput_s.items() if k != "other")
        badput = {**self.badput_s, "other": max(0.0, wall - self.productive_s - named)}
        return {
            "wall_s": wall,
            "productive_s": self.productive_s,
            "ratio": self.productive_s / wall if wall > 0 else 0.0,
            "badput_s": badput,
        }

    def resume_from(self, events: list[dict[str, Any]], now: float | None = None) -> None:
        """Continue the account of a previous driver from its journal entries (oldest first)."""
        totals = [e for e in events if e["event"] == "goodput"]
        if not totals or not events:
            return
        last = totals[-1]
        self.previous_wall_s = float(last["wall_s"])
        self.productive_s = float(last["productive_s"])
        for bucket, seconds in last["badput_s"].items():
            if bucket in self.badput_s and bucket != "other":
                self.badput_s[bucket] = float(seconds)
        # Heartbeats after that account were productive, but their steps will be trained again.
        later = [e for e in events if e["time"] > last["time"] and e["event"] == "heartbeat"]
        redone = sum(float(e.get("busy_s", 0.0)) for e in later)
        down = (time.time() if now is None else now) - events[-1]["time"]  # no driver was running
        self.previous_wall_s += events[-1]["time"] - last["time"] + down
        self.bad("lost_work", redone)
        self.bad("restart", down)
