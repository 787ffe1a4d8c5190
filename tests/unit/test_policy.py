"""The failure policy is a pure function: table-driven tests, no Ray."""

from __future__ import annotations

import pytest

from trainer.policy import Action, Budget, FailureEvent, FailureKind, decide


def _event(kind: FailureKind, ranks: tuple[int, ...] = (), step: int = 5) -> FailureEvent:
    return FailureEvent(kind, ranks, step, "sim_npu", 0.0)


@pytest.mark.parametrize(
    ("history", "max_restarts", "action", "ranks", "reason_has"),
    [
        ([_event(FailureKind.WORKER_LOST, (1,))], 3, Action.REPLACE_WORKER, (1,), "1/3 restarts used"),
        ([_event(FailureKind.DEADLINE, (0,))], 3, Action.REPLACE_WORKER, (0,), "deadline on ranks [0]"),
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
    ],
)
def test_decide(
    history: list[FailureEvent], max_restarts: int, action: Action, ranks: tuple[int, ...], reason_has: str
) -> None:
    decision = decide(history, Budget(max_restarts))
    assert decision.action is action
    assert decision.ranks == ranks
    assert reason_has in decision.reason


def test_decide_needs_an_event() -> None:
    with pytest.raises(ValueError, match="at least one failure"):
        decide([], Budget(3))
