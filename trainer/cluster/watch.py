"""Running one chunk of steps on every rank, under deadlines: finished, failed, lost or hung.

A rank is hung when it has made no progress for ``hang_after_s``: its last progress mark (set at the
start of each step and when it enters the step's first collective) is older than that, *and* it is not
sitting in a collective — a rank blocked in an all-reduce is waiting for a peer, not the culprit. Hung
ranks are killed at once, which makes their peers' collectives fail in a fraction of a second instead of
at the collective timeout.

Once a rank is lost, killed as hung, or reports a collective error, the others are *released*, not killed:
each rank that sees a collective error drops its process group at once (``WorkerActor.train``), its
sockets close, and the peers still waiting on it fail in cascade and return with their process, model and
state intact; the ones still training are asked to close their connections too (:func:`release`). They
get ``release_s`` to do so; the ones still pending after that are blocked behind a live peer that is itself
stuck, and are killed and replaced with the lost and hung ones.

With ``relays`` (:mod:`trainer.cluster.relay`), the members of a node that hosts several are reached
through that node's relay — one call per node and chunk, and one per node for the hang check — and each
member's reply, loss or error is still taken in one by one, at most one poll later than directly.

Release paths, by backend:
- gloo (the only one exercised here, CPU and simulated families): a closed connection fails a peer blocked
  in ``recv`` with "Connection closed by peer". Dropping the group closes its connections — unless
  something still holds the group, as torch does under FSDP: so the ranks still training are also asked
  to shut down their own connections (:func:`release`, :mod:`trainer.devices.group_sockets`), which
  releases a rank whichever peer it waits on (at 4 FSDP ranks, one lost, the rank that did not neighbour
  it was otherwise never released, and was killed and replaced). gloo's ``ProcessGroup.abort()`` returns
  without releasing a rank blocked in a collective, and gloo has no ``shrink_group``.
- NCCL (CUDA) and HCCL (Ascend) — would run only on hardware this project is not tested on, and are not
  implemented: a rank blocked in a collective is released by aborting its communicator
  (``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``, CleanUpOnly: abort the communicator, keep the process; the
  default 3 kills the process) plus an explicit ``ProcessGroup.abort()`` by the rank that saw the error;
  HCCL likewise, through the device adapter. Until then, such a peer waits in its collective and is killed
  here when ``release_s`` runs out, as on any backend where the cascade does not reach it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer.cluster import calls
from trainer.cluster.relay import Relays, Routes, progress_of, train_args
from trainer.policy import FailureKind

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
    #: Live ranks still blocked ``release_s`` after a peer failed: killed, to be replaced.
    unreleased: list[int] = field(default_factory=list)
    #: The release window those ranks were given (seconds).
    release_s: float | None = None
    #: The step every rank stopped after (preemption); None: the chunk ran to its end.
    stop_step: int | None = None
    #: Lost ranks that were asked to leave (a drained node, a leaving notice): planned removals.
    preempted: list[int] = field(default_factory=list)

    @classmethod
    def at(cls, steps: dict[int, int | None] | dict[int, int], lost: list[int] | None = None) -> ChunkOutcome:
        """No chunk ran: the ranks are at these steps (outside a chunk, a loss is found by asking them)."""
        return cls(results={r: {"ok": True, "step": s} for r, s in steps.items()}, lost=lost or [])

    def failed(self) -> bool:
        return bool(self.gone() or any(not r["ok"] for r in self.results.values()))

    def gone(self) -> list[int]:
        """Ranks whose workers are dead (lost, or killed here): the ones a repair must replace."""
        return sorted({*self.lost, *self.hung, *self.unreleased})

    def event(self) -> tuple[FailureKind, tuple[int, ...], str]:
        """A failed chunk as an event for the policy: lost ranks first, then hung ones, else a collective
        error; with each failing rank's error."""
        detail = "; ".join(f"rank {r}: {res['error']}" for r, res in self.results.items() if not res["ok"])
        if self.lost and set(self.lost) <= set(self.preempted):
            return FailureKind.WORKER_PREEMPTED, tuple(self.lost), detail
        if self.lost:
            return FailureKind.WORKER_LOST, tuple(self.lost), detail
        if self.hung:
            return FailureKind.DEADLINE, tuple(self.hung), detail
        return FailureKind.COLLECTIVE_FAILED, (), detail


def run_chunk(
    members: list[Any],
    until: int,
    hang_after_s: float,
    deadline_s: float,
    release_s: float,
    stop: Callable[[], bool] | None = None,
    relays: Relays | None = None,
    ahead: int | None = None,
    every: int = 0,
    compile_s: float = 0.0,
) -> ChunkOutcome:
    """Every member trains until step ``until``; returns when all replied, or once a rank is lost or hung
    and the others are released (or, after ``release_s``, killed). Once ``stop()`` is true, every rank is
    asked to stop after the step in flight (:func:`stop_all`) and the chunk ends there, with every rank at
    that step (:func:`_settle_stop`). With ``relays``, the members of a node that hosts several are called
    through its relay (:mod:`trainer.cluster.relay`): one call per node instead of one per member.

    With ``ahead``, each rank goes on training towards it once it replied, chunk ends every ``every`` steps
    (:mod:`trainer.cluster.stretch`); a stop may then fall after ``until``, up to ``ahead``.

    A rank inside a compilation (``train.compile``: progress phase ``compile``) is hung only after
    ``compile_s``, and while one compiles the chunk's deadline is ``deadline_s`` from the moment it is seen."""
    routes = relays.routes(members) if relays is not None else Routes(direct=list(range(len(members))))
    args = train_args(until, ahead, every)
    # Each call awaited: the relay it went through (None: a member called directly) and the ranks it covers.
    waiting: dict[Any, tuple[Any, list[int]]] = {
        relay.train.remote(until, _POLL_S, ahead, every): (relay, ranks) for relay, ranks in routes.relayed
    }
    waiting.update({members[rank].train.remote(*args): (None, [rank]) for rank in routes.direct})
    outcome = ChunkOutcome()
    started = time.monotonic()
    give_up_at = started + deadline_s
    release_by: float | None = None
    caught_up = ahead is None
    while waiting:
        done, _ = calls.wait(list(waiting), num_returns=len(waiting), timeout=_POLL_S)
        for ref in done:
            relay, ranks = waiting.pop(ref)
            rest = _collect(ref, relay, ranks, outcome, relays)
            if rest:  # a relay returned on a failure: the rest of its node's replies are still due
                waiting[relay.more.remote(_POLL_S)] = (relay, rest)
        if not caught_up and outcome.failed():
            # Ranks that replied went on training: they meet the failure in a later step. Awaited as the
            # others are (released, or killed once the release window ran out), so none is left training.
            caught_up = True
            on = [r for r, res in outcome.results.items() if res["ok"] and r not in outcome.gone()]
            waiting.update({members[rank].train.remote(ahead): (None, [rank]) for rank in on})
            if release_by is not None:
                release(members, on)
        pending = sorted(rank for _, ranks in waiting.values() for rank in ranks)
        if stop is not None and outcome.stop_step is None and pending and stop():
            outcome.stop_step = stop_all(members, max(until, ahead or until))
        if outcome.stop_step is not None and not outcome.failed():
            waiting.update(_settle_stop(members, pending, outcome))
        if not waiting:
            break
        now = time.monotonic()
        if release_by is None and outcome.failed():
            release_by = now + release_s  # a peer failed: the others should be on their way out
            release(members, pending)
        if release_by is not None:
            if now < release_by:
                continue
            outcome.unreleased, outcome.release_s = pending, release_s
            log.warning("ranks %s not released within %.1f s: killed", outcome.unreleased, release_s)
            for rank in outcome.unreleased:
                calls.kill(members[rank])
            break
        # Each rank's progress mark is refreshed when its train() starts, so nobody can have been silent
        # for longer than the chunk has run: no need to ask before then (asking costs the workers time).
        if now - started < hang_after_s and now < give_up_at:
            continue
        hung, silent_for, compiling = _find_hung(members, pending, hang_after_s, compile_s, routes)
        if compiling:
            give_up_at = max(give_up_at, now + deadline_s)
        if not hung and time.monotonic() > give_up_at:
            hung, silent_for = pending, deadline_s
        if hung:
            outcome.hung, outcome.hang_detected_after_s = hung, silent_for
            for rank in hung:
                calls.kill(members[rank])
            # Their peers now fail fast ("connection closed") and are released.
            for ref, (relay, ranks) in list(waiting.items()):
                waiting[ref] = (relay, [r for r in ranks if r not in hung])
            waiting = {ref: entry for ref, entry in waiting.items() if entry[1]}
            release_by = time.monotonic() + release_s
            release(members, sorted(r for _, ranks in waiting.values() for r in ranks))
    return outcome


def release(members: list[Any], ranks: list[int]) -> None:
    """Ask ``ranks`` (still training, a peer failed) to shut down their connections of the group, so that
    each leaves its collective now whichever peer it waits on (``WorkerActor.release``); not awaited."""
    for rank in ranks:
        members[rank].release.remote()


def _collect(
    ref: Any, relay: Any, ranks: list[int], outcome: ChunkOutcome, relays: Relays | None
) -> list[int]:
    """Take in one finished call (a member's reply, or a relay's replies for ``ranks``); returns the ranks
    it still owes."""
    try:
        value = calls.get(ref)
    except calls.lost_errors() as exc:  # the member died, or the relay with its node
        if relay is not None and relays is not None:
            relays.forget(relay)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for rank in ranks:
            _lost(outcome, rank, first, bool(getattr(exc, "preempted", False)))
        return []
    replies = value if relay is not None else {ranks[0]: value}
    for rank in ranks:
        reply = replies.get(rank)
        if reply is None:
            continue
        if reply.get("lost"):
            _lost(outcome, rank, reply["error"], reply["preempted"])
            continue
        earlier = outcome.results.get(rank)  # this rank's reply before it caught up to the stop step
        outcome.results[rank] = reply if earlier is None else _joined(earlier, reply)
    return [rank for rank in ranks if rank not in replies]


def _lost(outcome: ChunkOutcome, rank: int, error: str, preempted: bool) -> None:
    log.warning("rank %d lost: %s", rank, error)
    outcome.lost = sorted([*outcome.lost, rank])  # in rank order, whatever order they died in
    if preempted:  # Ray says so: its node was drained
        outcome.preempted = sorted([*outcome.preempted, rank])


def stop_all(members: list[Any], until: int) -> int:
    """Ask every member to stop after the step in flight (``until`` at most); returns that step.

    Ranks step in lockstep (each step's all-reduce waits for all), so they are at most one step apart: the
    step in flight is the most advanced rank's — one that replied already may be training on (``ahead``), so
    every rank is asked. Ranks that move on before the request reaches them are brought to one step again
    by :func:`_settle_stop`.
    """
    furthest = _furthest_in_flight(members)
    stop_step = _ask_stop(members, min(until, furthest if furthest >= 0 else until))
    log.warning("stopping every rank after step %d", stop_step)
    return stop_step


def _ask_stop(members: list[Any], step: int) -> int:
    """Every member stops after ``step`` (or the step in flight, if later); returns once each has the request."""
    asked = [m.stop_after.remote(step) for m in members]
    for ref in asked:
        try:
            calls.get(ref, timeout=5.0)
        except calls.call_errors():
            continue  # a lost rank surfaces through its train() reply
    return step


def _settle_stop(
    members: list[Any], pending: list[int], outcome: ChunkOutcome
) -> dict[Any, tuple[None, list[int]]]:
    """Bring every rank to one stop step; returns the catch-up calls started (ref → (None, [rank])).

    A stop request reaches the ranks one by one: a rank that had already finished ``outcome.stop_step`` and
    started the next step goes on with it and waits in its collective for the others. Then the stop step
    becomes that step, every rank is asked to stop after it, and the ranks that stopped earlier train on
    to it (their collectives meet the waiting rank's) — no healthy rank is left waiting alone or replaced.
    ``pending``: the ranks whose reply is still due.
    """
    assert outcome.stop_step is not None
    furthest = _furthest_in_flight(members)
    if furthest > outcome.stop_step:
        outcome.stop_step = _ask_stop(members, furthest)
        log.warning("a rank was already in step %d: every rank stops after it", furthest)
    running = set(pending)
    behind = [
        rank
        for rank, reply in outcome.results.items()
        if reply["ok"] and reply["step"] < outcome.stop_step and rank not in running
    ]
    return {members[rank].train.remote(outcome.stop_step): (None, [rank]) for rank in behind}


def _furthest_in_flight(members: list[Any]) -> int:
    """The most advanced step among the members: the one in flight, else (idle) the last one done; -1: none
    answered. Every member is asked: one whose reply is in may be training on (``ahead``)."""
    probes = [member.progress.remote() for member in members]
    furthest = -1
    for ref in probes:
        try:
            progress = calls.get(ref, timeout=5.0)
        except calls.call_errors():
            continue
        furthest = max(furthest, int(progress["step"]) + (progress["phase"] != "idle"))
    return furthest


def _joined(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One rank's replies to two train() calls of the same chunk, as one (the later one's end state)."""
    if not later["ok"]:
        return later
    joined = dict(later)
    for key in ("losses", "step_times", "compute_times", "skipped_steps"):
        joined[key] = [*earlier.get(key, []), *later.get(key, [])]
    joined["elapsed_s"] = earlier["elapsed_s"] + later["elapsed_s"]
    return joined


def _find_hung(
    members: list[Any], ranks: list[int], hang_after_s: float, compile_s: float, routes: Routes
) -> tuple[list[int], float, bool]:
    """Ranks making no progress outside a collective for longer than ``hang_after_s`` — inside a
    compilation, ``compile_s`` — (asked through the relays: one call per node); and whether a rank is
    compiling within its limit."""
    now = time.time()
    hung, worst, compiling = [], 0.0, False
    for rank, progress in progress_of(members, ranks, routes).items():
        silent = now - float(progress["since"])
        phase = progress["phase"]
        limit = compile_s if phase == "compile" and compile_s > 0 else hang_after_s
        if phase != "collective" and silent > limit:
            hung.append(rank)
            worst = max(worst, silent)
        elif phase == "compile":
            compiling = True
    return sorted(hung), worst, compiling
