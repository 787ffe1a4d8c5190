"""The chunk watcher (``trainer.cluster.watch.run_chunk``) over four in-process stand-in ranks, no Ray: the
members are reached through the same call seam as Ray actors (``calls.InProcess``), so the watcher's rules —
a hung rank found by its stale progress mark and stopped, the others released rather than killed, a stop
brought to one step on every rank — are checked here in about a second each, at more than two ranks.

A stand-in rank trains in lockstep with its peers as gloo ranks do: each step waits at a barrier for every
rank (a "collective"); a rank that hangs in compute stops marking progress and never reaches the barrier,
and its peers wait in the collective until they are released (their connections shut down), then return
``ok=False`` as a survivor of a failed collective does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from trainer.cluster import calls
from trainer.cluster.watch import run_chunk

SIZE = 4
STEP_S = 0.01


class Group:
    """What the stand-in ranks share: the barrier of their collectives."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size)


class StandInRank:
    """A worker's call surface (train, progress, stop_after, release, info) over a barrier-synchronised step."""

    def __init__(self, group: Group, rank: int, hang_at: int | None = None) -> None:
        self.group, self.rank, self.hang_at = group, rank, hang_at
        self.step, self.phase, self.since = 0, "idle", time.time()
        self.stop_step: int | None = None
        self.released = threading.Event()

    def info(self) -> dict[str, Any]:
        return {"node": None, "step": self.step}

    def train(self, until: int) -> dict[str, Any]:
        losses, began = [], time.monotonic()
        while self.step < until and (self.stop_step is None or self.step < self.stop_step):
            self.phase, self.since = "compute", time.time()
            if self.step + 1 == self.hang_at:
                threading.Event().wait()  # alive, making no progress, never reaching the collective
            time.sleep(STEP_S)
            self.phase, self.since = "collective", time.time()
            try:
                self.group.barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                return {"ok": False, "step": self.step, "error": "RuntimeError: Connection closed by peer"}
            self.step += 1
            losses.append(1.0 / self.step)
        self.phase, self.since = "idle", time.time()
        return {
            "ok": True,
            "step": self.step,
            "losses": losses,
            "step_times": [STEP_S] * len(losses),
            "elapsed_s": time.monotonic() - began,
        }

    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "phase": self.phase, "since": self.since}

    def stop_after(self, step: int) -> int:
        self.stop_step = step
        return self.step

    def release(self) -> int:
        """Its connections shut: a peer waiting in the collective fails at once."""
        self.released.set()
        self.group.barrier.abort()
        return 1


def _members(hang: dict[int, int] | None = None) -> tuple[list[calls.InProcess], list[StandInRank]]:
    group = Group(SIZE)
    ranks = [StandInRank(group, r, (hang or {}).get(r)) for r in range(SIZE)]
    return [calls.InProcess(r, name=f"rank{r.rank}") for r in ranks], ranks


def test_every_rank_trains_the_chunk_and_replies() -> None:
    members, ranks = _members()
    outcome = run_chunk(members, 5, hang_after_s=5.0, deadline_s=30.0, release_s=5.0)
    assert not outcome.failed() and sorted(outcome.results) == list(range(SIZE))
    assert {r: reply["step"] for r, reply in outcome.results.items()} == dict.fromkeys(range(SIZE), 5)
    assert [r.step for r in ranks] == [5] * SIZE


def test_a_rank_hung_in_compute_is_stopped_and_its_peers_are_released_not_killed() -> None:
    members, ranks = _members(hang={2: 4})
    outcome = run_chunk(members, 10, hang_after_s=0.5, deadline_s=30.0, release_s=5.0)

    assert outcome.hung == [2] and outcome.hang_detected_after_s >= 0.5
    assert outcome.unreleased == []  # the others left their collective when asked: none had to be stopped
    assert sorted(outcome.results) == [0, 1, 3]
    assert all(not reply["ok"] and reply["step"] == 3 for reply in outcome.results.values())
    assert members[2].lost.is_set() and not any(members[r].lost.is_set() for r in (0, 1, 3))
    assert all(ranks[r].released.is_set() for r in (0, 1, 3))


def test_a_stop_brings_every_rank_to_one_step() -> None:
    members, ranks = _members()
    asked = time.monotonic() + 0.2
    outcome = run_chunk(
        members, 1000, hang_after_s=5.0, deadline_s=60.0, release_s=5.0, stop=lambda: time.monotonic() > asked
    )
    assert outcome.stop_step is not None and 0 < outcome.stop_step < 1000
    assert not outcome.failed()
    assert {r: reply["step"] for r, reply in outcome.results.items()} == dict.fromkeys(
        range(SIZE), outcome.stop_step
    )
    assert {r.step for r in ranks} == {outcome.stop_step}
    # a rank asked to go on to the stop step after its first reply answers once, for the whole chunk
    assert all(len(reply["losses"]) == outcome.stop_step for reply in outcome.results.values())


class LateToHear(StandInRank):
    """A rank the first stop request reaches only after it has started the next step (its peers stopped
    before it)."""

    def stop_after(self, step: int) -> int:
        deadline = time.monotonic() + 10
        while self.stop_step is None and not (self.step >= step and self.phase == "compute"):
            if time.monotonic() > deadline:
                raise AssertionError(f"rank {self.rank} never started step {step + 1}")
            time.sleep(0.001)
        self.stop_step = max(step, self.step + 1)
        return self.step


def test_a_rank_already_in_the_next_step_moves_the_stop_and_the_others_catch_up_in_one_reply() -> None:
    group = Group(SIZE)
    ranks = [StandInRank(group, r) for r in range(SIZE - 1)] + [LateToHear(group, SIZE - 1)]
    members = [calls.InProcess(r, name=f"rank{r.rank}") for r in ranks]
    asked = time.monotonic() + 0.2
    outcome = run_chunk(
        members, 1000, hang_after_s=5.0, deadline_s=60.0, release_s=5.0, stop=lambda: time.monotonic() > asked
    )
    assert not outcome.failed() and outcome.stop_step is not None
    assert {r.step for r in ranks} == {outcome.stop_step}
    for reply in outcome.results.values():  # the early ranks' two train() replies joined into one
        assert reply["step"] == outcome.stop_step and len(reply["losses"]) == outcome.stop_step
        assert reply["losses"] == [1.0 / s for s in range(1, outcome.stop_step + 1)]


class Compiling(StandInRank):
    """A rank that compiles (progress phase ``compile``, as ``trainer.compiling`` marks a worker) for
    ``compile_for`` seconds at the start of step ``at``; its peers wait for it in the collective."""

    def __init__(self, group: Group, rank: int, at: int, compile_for: float) -> None:
        super().__init__(group, rank)
        self.at, self.compile_for = at, compile_for

    def train(self, until: int) -> dict[str, Any]:
        if self.step < self.at:
            first = super().train(self.at - 1)
            if not first["ok"]:
                return first
            self.phase, self.since = "compile", time.time()
            time.sleep(self.compile_for)
            rest = super().train(until)
            rest["losses"] = first["losses"] + rest["losses"]
            return rest
        return super().train(until)


def _with_compiling(compile_for: float) -> tuple[list[calls.InProcess], list[StandInRank]]:
    group = Group(SIZE)
    ranks = [StandInRank(group, r) for r in range(SIZE - 1)] + [Compiling(group, SIZE - 1, 3, compile_for)]
    return [calls.InProcess(r, name=f"rank{r.rank}") for r in ranks], ranks


def test_a_rank_compiling_longer_than_the_hang_limit_and_the_chunk_deadline_is_not_hung() -> None:
    members, ranks = _with_compiling(1.5)
    outcome = run_chunk(members, 6, hang_after_s=0.3, deadline_s=1.0, release_s=5.0, compile_s=10.0)
    assert not outcome.failed(), outcome
    assert [r.step for r in ranks] == [6] * SIZE


def test_without_a_compile_limit_the_same_rank_is_hung() -> None:
    members, _ = _with_compiling(1.5)
    outcome = run_chunk(members, 6, hang_after_s=0.3, deadline_s=1.0, release_s=5.0)
    assert outcome.hung == [SIZE - 1] and outcome.unreleased == []


def test_a_compilation_past_its_own_limit_is_a_hang() -> None:
    members, _ = _with_compiling(3.0)
    outcome = run_chunk(members, 6, hang_after_s=0.3, deadline_s=30.0, release_s=5.0, compile_s=1.0)
    assert outcome.hung == [SIZE - 1] and outcome.hang_detected_after_s >= 1.0
