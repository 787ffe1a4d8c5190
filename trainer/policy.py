"""Failure policy: a pure function from the run's event history to a decision. No Ray, no torch.

The controller records every failure and every health finding as a :class:`FailureEvent` and carries
out whatever :func:`decide` returns. Rules, in order:

1. a family that cannot be used at all → FALLBACK to the next family of the chain;
2. more failures in the run than ``max_restarts`` → ABORT;
3. on the current family, ``max_failures_per_family`` failures or ``max_degraded_probes`` degraded probes
   within ``window_s`` (or a failed parity check) → FALLBACK, or ABORT when no family is left;
4. a device that computes wrong or a repeated straggler → EXCLUDE that rank's worker;
5. a degraded probe below the limit → CONTINUE (it counts towards rule 3);
6. a lost or hung worker → REPLACE_WORKER; anything else → RETRY.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.config import Config


class FailureKind(StrEnum):
    #: A worker's process or node is gone (actor died, SIGKILL, node lost).
    WORKER_LOST = "worker_lost"
    #: A worker was asked to leave (SIGTERM to it, a drained node): a planned removal, not a failure.
    WORKER_PREEMPTED = "worker_preempted"
    #: A collective failed on a live worker (a peer vanished mid-step, a flaky link).
    COLLECTIVE_FAILED = "collective_failed"
    #: A worker made no progress before its deadline (hung).
    DEADLINE = "deadline"
    #: The worker raised an error of its own (bad data, a bug, out of memory).
    WORKER_ERROR = "worker_error"
    #: An interconnect probe measured bandwidth below the baseline, or failed.
    DEGRADED_PROBE = "degraded_probe"
    #: A device probe found a wrong result (silent data corruption).
    WRONG_COMPUTE = "wrong_compute"
    #: The family's own health tools report a device failing (uncorrectable ECC, fatal XID, link down).
    DEVICE_UNHEALTHY = "device_unhealthy"
    #: A rank was flagged as a straggler repeatedly.
    STRAGGLER = "straggler"
    #: The family's workers cannot start (no devices, no resources, driver missing).
    FAMILY_UNAVAILABLE = "family_unavailable"
    #: After a hand-over, the held-out loss differs from the old family's beyond tolerance.
    PARITY_FAILED = "parity_failed"


#: Kinds that count as failures of the family they happened on (rule 3).
_FAMILY_FAILURES = {
    FailureKind.WORKER_LOST,
    FailureKind.COLLECTIVE_FAILED,
    FailureKind.DEADLINE,
    FailureKind.WORKER_ERROR,
}
#: Kinds that name devices to leave out: their workers are excluded and replaced from spares.
_EXCLUDED = {FailureKind.WRONG_COMPUTE, FailureKind.DEVICE_UNHEALTHY, FailureKind.STRAGGLER}
#: Kinds that are findings, not failures: they do not spend the restart budget.
_FINDINGS = {FailureKind.DEGRADED_PROBE, FailureKind.STRAGGLER, FailureKind.WORKER_PREEMPTED}


class Action(StrEnum):
    #: A finding that needs no action yet (it counts towards a later FALLBACK).
    CONTINUE = "continue"
    RETRY = "retry"
    REPLACE_WORKER = "replace_worker"
    EXCLUDE = "exclude"
    FALLBACK = "fallback"
    ABORT = "abort"


@dataclass(frozen=True)
class FailureEvent:
    kind: FailureKind
    #: Ranks whose workers caused it (not the peers that merely noticed).
    ranks: tuple[int, ...]
    step: int
    family: str
    time: float
    detail: str = ""

    def record(self) -> dict[str, Any]:
        """The journal's ``failure`` entry."""
        return {
            "kind": self.kind.value,
            "family": self.family,
            "ranks": list(self.ranks),
            "step": self.step,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class PolicyConfig:
    max_restarts: int
    fallback_chain: tuple[str, ...] = ()
    max_failures_per_family: int = 3
    max_degraded_probes: int = 2
    window_s: float = 600.0
    retry_given_up_families: bool = False
    #: Families given up earlier in this run.
    given_up: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, config: Config, given_up: set[str]) -> PolicyConfig:
        """The policy a run's configuration sets, with the families given up so far."""
        ft = config.fault_tolerance
        return cls(
            max_restarts=config.cluster.max_restarts,
            fallback_chain=tuple(ft.fallback_chain),
            max_failures_per_family=ft.max_failures_per_family,
            max_degraded_probes=ft.max_degraded_probes,
            window_s=ft.window_s,
            retry_given_up_families=ft.retry_given_up_families,
            given_up=frozenset(given_up),
        )


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    ranks: tuple[int, ...] = ()
    #: The family to move to (FALLBACK only).
    family: str | None = None

    def record(self, step: int) -> dict[str, Any]:
        """The journal's ``decision`` entry, taken at ``step``."""
        return {
            "action": self.action.value,
            "reason": self.reason,
            "ranks": list(self.ranks),
            "family": self.family,
            "step": step,
        }


def next_family(current: str, policy: PolicyConfig) -> str | None:
    """The first family of the chain that is not the current one and not given up (unless allowed)."""
    for family in policy.fallback_chain:
        if family == current:
            continue
        if family in policy.given_up and not policy.retry_given_up_families:
            continue
        return family
    return None


def _fallback(event: FailureEvent, policy: PolicyConfig, why: str) -> Decision:
    target = next_family(event.family, policy)
    if target is None:
        tried = sorted({*policy.given_up, event.family})
        return Decision(
            Action.ABORT,
            f"{why}; no family left to fall back to (given up: {', '.join(tried)}; "
            f"fault_tolerance.fallback_chain={list(policy.fallback_chain)})",
        )
    return Decision(Action.FALLBACK, f"{why}; hand the run over to {target}", family=target)


def decide(history: Sequence[FailureEvent], policy: PolicyConfig) -> Decision:
    """What to do about ``history[-1]``, given every event of the run so far (oldest first)."""
    if not history:
        raise ValueError("decide() needs at least one failure event")
    event = history[-1]
    if event.kind is FailureKind.FAMILY_UNAVAILABLE:
        return _fallback(
            event, policy, f"family {event.family} is unavailable ({event.detail or 'no detail'})"
        )
    if event.kind is FailureKind.PARITY_FAILED:
        return _fallback(event, policy, f"parity check failed on {event.family} at step {event.step}")

    if event.kind is FailureKind.WORKER_PREEMPTED and event.ranks:
        return Decision(
            Action.REPLACE_WORKER,
            f"ranks {list(event.ranks)} asked to leave at step {event.step} (preempted): a planned removal, "
            "replaced from spares with a peer's state; not a failure of the family",
            event.ranks,
        )

    failures = [e for e in history if e.kind not in _FINDINGS]
    if event.kind not in _FINDINGS and len(failures) > policy.max_restarts:
        return Decision(
            Action.ABORT,
            f"{len(failures)} failures exceed cluster.max_restarts={policy.max_restarts}; last: "
            f"{event.kind.value} on ranks {list(event.ranks)} at step {event.step}",
        )

    recent = [e for e in history if e.family == event.family and event.time - e.time <= policy.window_s]
    family_failures = sum(e.kind in _FAMILY_FAILURES for e in recent)
    degraded = sum(e.kind is FailureKind.DEGRADED_PROBE for e in recent)
    if family_failures >= policy.max_failures_per_family:
        return _fallback(
            event,
            policy,
            f"{family_failures} failures on {event.family} within {policy.window_s:.0f} s "
            f"(fault_tolerance.max_failures_per_family={policy.max_failures_per_family})",
        )
    if degraded >= policy.max_degraded_probes:
        return _fallback(
            event,
            policy,
            f"{degraded} degraded interconnect probes on {event.family} within {policy.window_s:.0f} s "
            f"(fault_tolerance.max_degraded_probes={policy.max_degraded_probes}); last: {event.detail}",
        )

    if event.kind in _EXCLUDED and event.ranks:
        return Decision(
            Action.EXCLUDE,
            f"{event.kind.value} on ranks {list(event.ranks)}: exclude their devices, continue on spares",
            event.ranks,
        )
    if event.kind is FailureKind.DEGRADED_PROBE:
        return Decision(
            Action.CONTINUE,
            f"degraded probe on {event.family} ({degraded}/{policy.max_degraded_probes} within the window): "
            f"keep training and watch; {event.detail}",
        )
    if event.kind in (FailureKind.WORKER_LOST, FailureKind.DEADLINE) and event.ranks:
        return Decision(
            Action.REPLACE_WORKER,
            f"{event.kind.value} on ranks {list(event.ranks)} at step {event.step}: replace them, from warm spares "
            f"first ({len(failures)}/{policy.max_restarts} restarts used)",
            event.ranks,
        )
    return Decision(
        Action.RETRY,
        f"{event.kind.value} at step {event.step}: re-form the group and retry from the newest state "
        f"({len(failures)}/{policy.max_restarts} restarts used)",
    )
