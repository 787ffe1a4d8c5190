"""Failure policy: a pure function from the run's failure history to a decision. No Ray, no torch.

The controller records every failure as a :class:`FailureEvent` and carries out whatever :func:`decide`
returns; tests drive :func:`decide` with tables of histories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class FailureKind(StrEnum):
    #: A worker's process or node is gone (actor died, SIGKILL, node lost).
    WORKER_LOST = "worker_lost"
    #: A collective failed on a live worker (a peer vanished mid-step).
    COLLECTIVE_FAILED = "collective_failed"
    #: A worker did not reply before its deadline (hung or far too slow).
    DEADLINE = "deadline"
    #: The worker raised an error of its own (bad data, a bug, out of memory).
    WORKER_ERROR = "worker_error"


class Action(StrEnum):
    RETRY = "retry"
    REPLACE_WORKER = "replace_worker"
    ABORT = "abort"


@dataclass(frozen=True)
class FailureEvent:
    kind: FailureKind
    #: Ranks whose workers caused the failure (not the peers that merely noticed it).
    ranks: tuple[int, ...]
    step: int
    family: str
    time: float
    detail: str = ""


@dataclass(frozen=True)
class Budget:
    #: Recoveries allowed in one run.
    max_restarts: int


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    ranks: tuple[int, ...] = ()


def decide(history: Sequence[FailureEvent], budget: Budget) -> Decision:
    """What to do about ``history[-1]``, given every failure of the run so far (oldest first)."""
    if not history:
        raise ValueError("decide() needs at least one failure event")
    event = history[-1]
    if len(history) > budget.max_restarts:
        return Decision(
            Action.ABORT,
            f"{len(history)} failures exceed cluster.max_restarts={budget.max_restarts}; last: "
            f"{event.kind.value} on ranks {list(event.ranks)} at step {event.step}",
        )
    if event.kind in (FailureKind.WORKER_LOST, FailureKind.DEADLINE) and event.ranks:
        return Decision(
            Action.REPLACE_WORKER,
            f"{event.kind.value} on ranks {list(event.ranks)} at step {event.step}: replace them with warm spares "
            f"({len(history)}/{budget.max_restarts} restarts used)",
            event.ranks,
        )
    return Decision(
        Action.RETRY,
        f"{event.kind.value} at step {event.step}: re-form the group and retry from the newest state "
        f"({len(history)}/{budget.max_restarts} restarts used)",
    )
