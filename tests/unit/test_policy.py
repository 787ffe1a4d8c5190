"""The failure policy is a pure function: table-driven tests, no Ray."""

from __future__ import annotations

import pytest

from trainer.policy import Action, FailureEvent, FailureKind, PolicyConfig, decide


def _event(kind: FailureKind, ranks: tuple[int, ...] = (), step: int = 5) -> FailureEvent:
    return FailureEvent(kind, ranks, step, "sim_npu", 0.0)


@pytest.mark.parametrize(
    ("history", "max_restarts", "action", "ranks", "reason_has"),
    [
        ([_event(FailureKind.WORKER_LOST, (1,))], 3, Action.REPLACE_WORKER, (1,), "1/3 restarts used"),
        ([_event(FailureKind.DEADLINE, (0,))], 3, Action.REPLACE_WORKER, (0,), "deadline on ranks [0]"),
        # Several ranks lost at once are one failure: all of them replaced, one restart spent.
        ([_event(FailureKind.WORKER_LOST, (1, 2))], 3, Action.REPLACE_WORKER, (1, 2), "[1, 2] at step 5"),
        ([_event(FailureKind.WORKER_LOST, (1, 2))], 1, Action.REPLACE_WORKER, (1, 2), "1/1 restarts used"),
        ([_event(FailureKind.COLLECTIVE_FAILED)], 3, Action.RETRY, (), "re-form the group"),
        ([_event(FailureKind.WORKER_ERROR, (0,))], 3, Action.RETRY, (), "worker_error at step 5"),
        ([_event(FailureKind.WORKER_LOST, (1,))] * 3, 3, Action.REPLACE_WORKER, (1,), "3/3 restarts used"),
        (
            [_event(FailureKind.WORKER_LOST, (1,))] * 4,
            3,
            Action.ABORT,
            (),
            "4 failures exceed cluster.max_restarts=3",
        ),
        ([_event(FailureKind.WORKER_LOST, (1,))], 0, Action.ABORT, (), "cluster.max_restarts=0"),
        # A worker asked to leave is a planned removal: replaced, never counted, even with no budget left.
        ([_event(FailureKind.WORKER_PREEMPTED, (2,))], 0, Action.REPLACE_WORKER, (2,), "planned removal"),
        (
            [_event(FailureKind.WORKER_PREEMPTED, (1,))] * 5 + [_event(FailureKind.WORKER_LOST, (1,))],
            1,
            Action.REPLACE_WORKER,
            (1,),
            "1/1 restarts used",
        ),
    ],
)
def test_decide(
    history: list[FailureEvent], max_restarts: int, action: Action, ranks: tuple[int, ...], reason_has: str
) -> None:
    decision = decide(history, PolicyConfig(max_restarts, max_failures_per_family=100))
    assert decision.action is action
    assert decision.ranks == ranks
    assert reason_has in decision.reason


def test_decide_needs_an_event() -> None:
    with pytest.raises(ValueError, match="at least one failure"):
        decide([], PolicyConfig(3))


def _at(kind: FailureKind, t: float, family: str = "sim_npu", ranks: tuple[int, ...] = ()) -> FailureEvent:
    return FailureEvent(kind, ranks, 10, family, t, "busbw 0.2 GB/s < 0.8 x 1.0 GB/s")


CHAIN = PolicyConfig(
    max_restarts=10,
    fallback_chain=("sim_cuda", "cpu"),
    max_failures_per_family=3,
    max_degraded_probes=2,
    window_s=600,
)


@pytest.mark.parametrize(
    ("history", "policy", "action", "family", "reason_has"),
    [
        # Two degraded probes within the window: give the family up.
        (
            [_at(FailureKind.DEGRADED_PROBE, 0), _at(FailureKind.DEGRADED_PROBE, 100)],
            CHAIN,
            Action.FALLBACK,
            "sim_cuda",
            "2 degraded interconnect probes on sim_npu",
        ),
        # The same two probes, but 20 minutes apart: only one is within the window.
        (
            [_at(FailureKind.DEGRADED_PROBE, 0), _at(FailureKind.DEGRADED_PROBE, 1200)],
            CHAIN,
            Action.CONTINUE,
            None,
            "1/2 within the window",
        ),
        # Three collective failures within the window on one family.
        (
            [_at(FailureKind.COLLECTIVE_FAILED, t) for t in (0, 10, 20)],
            CHAIN,
            Action.FALLBACK,
            "sim_cuda",
            "3 failures on sim_npu",
        ),
        # Failures on another family do not count against this one.
        (
            [
                _at(FailureKind.COLLECTIVE_FAILED, 0, "sim_cuda"),
                _at(FailureKind.COLLECTIVE_FAILED, 5, "sim_cuda"),
                _at(FailureKind.COLLECTIVE_FAILED, 10),
            ],
            CHAIN,
            Action.RETRY,
            None,
            "collective_failed",
        ),
        # A family unavailable at start: next in the chain.
        ([_at(FailureKind.FAMILY_UNAVAILABLE, 0)], CHAIN, Action.FALLBACK, "sim_cuda", "is unavailable"),
        # The next family was given up already: the one after it.
        (
            [_at(FailureKind.FAMILY_UNAVAILABLE, 0)],
            PolicyConfig(10, ("sim_cuda", "cpu"), given_up=frozenset({"sim_cuda"})),
            Action.FALLBACK,
            "cpu",
            "",
        ),
        # Every family of the chain given up: abort, naming them.
        (
            [_at(FailureKind.FAMILY_UNAVAILABLE, 0, "cpu")],
            PolicyConfig(10, ("sim_cuda", "cpu"), given_up=frozenset({"sim_npu", "sim_cuda"})),
            Action.ABORT,
            None,
            "no family left to fall back to (given up: cpu, sim_cuda, sim_npu",
        ),
        # A failed parity check after a hand-over: move on.
        (
            [_at(FailureKind.PARITY_FAILED, 0, "sim_cuda")],
            CHAIN,
            Action.FALLBACK,
            "cpu",
            "parity check failed",
        ),
        # A device computing wrong: exclude it, stay on the family.
        (
            [_at(FailureKind.WRONG_COMPUTE, 0, ranks=(1,))],
            CHAIN,
            Action.EXCLUDE,
            None,
            "wrong_compute on ranks [1]",
        ),
        ([_at(FailureKind.STRAGGLER, 0, ranks=(0,))], CHAIN, Action.EXCLUDE, None, "straggler on ranks [0]"),
    ],
)
def test_fallback_rules(
    history: list[FailureEvent], policy: PolicyConfig, action: Action, family: str | None, reason_has: str
) -> None:
    decision = decide(history, policy)
    assert decision.action is action, decision.reason
    assert decision.family == family
    assert reason_has in decision.reason


def test_given_up_family_may_be_retried_when_configured() -> None:
    policy = PolicyConfig(10, ("sim_cuda",), given_up=frozenset({"sim_cuda"}), retry_given_up_families=True)
    assert decide([_at(FailureKind.FAMILY_UNAVAILABLE, 0)], policy).family == "sim_cuda"


def test_findings_do_not_spend_the_restart_budget() -> None:
    probes = [_at(FailureKind.DEGRADED_PROBE, 0, "cpu")] * 5
    decision = decide(
        [*probes, _at(FailureKind.WORKER_LOST, 1, ranks=(1,))], PolicyConfig(1, max_degraded_probes=9)
    )
    assert decision.action is Action.REPLACE_WORKER


def test_preempted_workers_do_not_count_against_their_family() -> None:
    planned = [_at(FailureKind.WORKER_PREEMPTED, t, ranks=(1,)) for t in (1.0, 2.0, 3.0)]
    decision = decide([*planned, _at(FailureKind.WORKER_LOST, 4.0, ranks=(1,))], CHAIN)
    assert decision.action is Action.REPLACE_WORKER  # one failure on sim_npu, not four: no fallback
