"""Running one chunk of steps on every rank, under deadlines: finished, failed, lost or hung.

A rank is hung when it has made no progress for ``hang_after_s``: its last progress mark (set at the
start of each step and when it enters the step's first collective) is older than that, *and* it is not
sitting in a collective — a rank blocked in an all-reduce is waiting for a peer, not the culprit. Hung
ranks are killed at once, which makes their peers' collectives fail in a fraction of a second instead of
at the collective timeout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

log = logging.getLogger(__name__)

_POLL_S = 0.25


@dataclass
class ChunkOutcome:
    """What each rank said about one chunk: a heartbeat, a collective error, death, or silence."""

    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    hung: list[int] = field(default_factory=list)
    #: Seconds from the last progress of a hung rank to its detection.
    hang_detected_after_s: float | None = None

    def failed(self) -> bool:
        return bool(self.lost or self.hung or any(not r["ok"] for r in self.results.values()))


def run_chunk(members: list[Any], until: int, hang_after_s: float, deadline_s: float) -> ChunkOutcome:
    """Every member trains until step ``until``; returns when all replied, or a rank is lost or hung."""
    refs = {m.train.remote(until): rank for rank, m in enumerate(members)}
    outcome = ChunkOutcome()
    pending = list(refs)
    started = time.monotonic()
    give_up_at = started + deadline_s
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
        _collect(done, refs, outcome)
        if not pending:
            break
        # Each rank's progress mark is refreshed when its train() starts, so nobody can have been silent
        # for longer than the chunk has run: no need to ask before then (asking costs the workers time).
        if time.monotonic() - started < hang_after_s and time.monotonic() < give_up_at:
            continue
        hung, silent_for = _find_hung(members, [refs[r] for r in pending], hang_after_s)
        if not hung and time.monotonic() > give_up_at:
            hung, silent_for = sorted(refs[r] for r in pending), deadline_s
        if hung:
            outcome.hung, outcome.hang_detected_after_s = hung, silent_for
            for rank in hung:
                ray.kill(members[rank], no_restart=True)
            # Their peers now fail fast ("connection closed"); collect what they say.
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=30)
            _collect([r for r in done if refs[r] not in hung], refs, outcome)
            break
    return outcome


def _collect(done: list[Any], refs: dict[Any, int], outcome: ChunkOutcome) -> None:
    for ref in done:
        rank = refs[ref]
        try:
            outcome.results[rank] = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            log.warning("rank %d lost: %s", rank, str(exc).splitlines()[0])
            outcome.lost.append(rank)


def _find_hung(members: list[Any], ranks: list[int], hang_after_s: float) -> tuple[list[int], float]:
    """Ranks making no progress outside a collective for longer than ``hang_after_s``."""
    now = time.time()
    probes = {rank: members[rank].progress.remote() for rank in ranks}
    hung, worst = [], 0.0
    for rank, ref in probes.items():
        try:
            progress = ray.get(ref, timeout=5.0)
        except (ray.exceptions.RayError, TimeoutError):
            continue  # dead ranks surface through their train() reply
        silent = now - float(progress["since"])
        if progress["phase"] != "collective" and silent > hang_after_s:
            hung.append(rank)
            worst = max(worst, silent)
    return sorted(hung), worst
