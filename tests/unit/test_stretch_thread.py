"""A rank's training thread (:mod:`trainer.cluster.stretch`), on a real worker in this process (the member
of a group of one, ``WorkerActor(own_process=False)``): it trains on past a reply towards ``ahead`` without a
call, each reply holds exactly its chunk's steps, every step runs on one thread for the worker's life, a
stop caps the stretch and the next call starts what follows, and what the user's code raised while the
rank trained on is raised by the next call, not lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from trainer.cluster.actor import WorkerActor
from trainer.config import to_container
from trainer.errors import UserCodeError
from trainer.testing.configs import make_config


@pytest.fixture
def member() -> Iterator[WorkerActor]:
    config = make_config(
        "cluster=local",
        "device=cpu",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.seq_len=8",
        "train.global_batch_size=4",
    )
    actor = WorkerActor(to_container(config), 1, own_process=False)
    yield actor
    actor.stretch.close()


def _threads(actor: WorkerActor) -> list[int]:
    """The thread of every step from now on."""
    seen: list[int] = []
    step = actor.worker.train_step

    def recorded() -> Any:
        seen.append(threading.get_ident())
        return step()

    actor.worker.train_step = recorded  # type: ignore[method-assign]
    return seen


def _wait_for_step(actor: WorkerActor, step: int) -> None:
    deadline = time.monotonic() + 60
    while actor.worker.step < step or actor.stretch.running:
        assert time.monotonic() < deadline, f"the rank did not reach step {step} on its own"
        time.sleep(0.01)


def test_a_rank_trains_on_to_ahead_and_each_reply_holds_its_chunk(member: WorkerActor) -> None:
    threads = _threads(member)
    first = member.train(2, 6, 2)
    assert (first["step"], len(first["losses"]), len(first["step_times"])) == (2, 2, 2)
    _wait_for_step(member, 6)  # no call: it trained on, and stopped at ``ahead``
    assert member.worker.step == 6
    replies = [member.train(4, 6, 2), member.train(6, 6, 2)]
    assert [(r["step"], len(r["losses"])) for r in replies] == [(4, 2), (6, 2)]
    assert member.train(8)["step"] == 8  # a new stretch
    assert len(threads) == 8 and len(set(threads)) == 1 and threads[0] != threading.get_ident()


def test_a_stop_caps_the_stretch_and_the_next_call_goes_on_from_it(member: WorkerActor) -> None:
    member.train(1, 500, 1)
    member.stop_after(member.worker.step + 1)
    stopped = member.train(500)
    stop = stopped["step"]
    assert 2 <= stop < 500 and member.worker.step == stop and not member.stretch.running
    assert len(stopped["losses"]) == stop - 1
    after = member.train(stop + 2)
    assert (after["step"], len(after["losses"])) == (stop + 2, 2)


def test_the_users_error_while_training_on_is_raised_by_the_next_call(member: WorkerActor) -> None:
    task = member.worker.task
    loss = task.loss

    def failing(model: Any, batch: Any) -> Any:
        if member.worker.step + 1 == 5:
            raise KeyError("label")
        return loss(model, batch)

    task.loss = failing  # type: ignore[method-assign]
    assert member.train(2, 8, 2)["step"] == 2
    _wait_for_step(member, 4)  # it fails in step 5, between two calls
    with pytest.raises(UserCodeError, match=r"KeyError.*step 5"):
        member.train(4, 8, 2)
    assert member.worker.step == 4 and not member.stretch.running
