"""Stopping a running chunk (a driver's SIGTERM, a worker asked to leave) on a real 3-worker gloo group:
a stop request reaches the ranks one by one, so some may have stopped while others already started the
next step and wait in its collective. The chunk still ends with every rank at one step, none replaced.

The stop requests below arrive late on purpose (the race a loaded host makes), through the real actors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from trainer.cluster import watch
from trainer.cluster.group import WorkerGroup
from trainer.cluster.relay import Relays
from trainer.cluster.watch import run_chunk
from trainer.devices import get_adapter
from trainer.testing.configs import THREE_WORKERS, make_config

pytestmark = pytest.mark.usefixtures("local_ray")

UNTIL = 60


@pytest.fixture
def group() -> Iterator[WorkerGroup]:
    config = make_config(
        *THREE_WORKERS,
        "cluster.spares=0",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.seq_len=8",
        "train.global_batch_size=6",
        # Every collective waits 50 ms: steps are slow enough to catch the ranks in the middle of one.
        "+faults.families={sim_npu: {collective_delay_s: 0.05}}",
    )
    workers = WorkerGroup(config, get_adapter("sim_npu"), "127.0.0.1")
    workers.start()
    workers.form(timeout_s=60.0)
    yield workers
    workers.shutdown()


def _progress(member: Any) -> dict[str, Any]:
    return dict(ray.get(member.progress.remote(), timeout=10.0))


def _stopped(member: Any, step: int) -> bool:
    progress = _progress(member)
    return bool(progress["step"] >= step and progress["phase"] == "idle")


def _wait_until(check: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _late_for_every_rank(group: WorkerGroup, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The stop step is computed, then every rank is past it before the request arrives."""

    def stale(members: list[Any], until: int) -> int:
        _wait_until(lambda: min(_progress(m)["step"] for m in members) >= 4, "step 4 on every rank")
        return watch._ask_stop(members, 2)

    monkeypatch.setattr(watch, "stop_all", stale)
    return lambda: True


def _late_for_all_but_rank_0(group: WorkerGroup, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Rank 0 got the request in time and stopped; ranks 1 and 2 went on into the next step and wait in
    its collective for rank 0 (the request reached them a moment later)."""
    rank0 = group.members[0]
    asked: list[int] = []

    def stop() -> bool:
        if not asked:
            _wait_until(lambda: _progress(rank0)["step"] >= 3, "step 3 on rank 0")
            asked.append(_progress(rank0)["step"] + 1)
            ray.get(rank0.stop_after.remote(asked[0]))
            # Idle at (or after) the step asked: stopped there (between two steps it goes on at once).
            _wait_until(lambda: _stopped(rank0, asked[0]), "rank 0 stopped")
            return False  # its reply is collected first, as when it arrives before the others'
        return True

    return stop


@pytest.mark.parametrize(
    ("late", "relayed"),
    [
        pytest.param(_late_for_every_rank, False, id="every rank"),
        pytest.param(_late_for_all_but_rank_0, False, id="two ranks"),
        # About 20-40 s more (a group's start); the relay's contract itself is in test_relay.py.
        pytest.param(_late_for_all_but_rank_0, True, id="two ranks, through a relay", marks=pytest.mark.slow),
    ],
)
def test_a_stop_request_that_arrives_late_still_stops_every_rank_at_one_step(
    late: Any, relayed: bool, group: WorkerGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a relay, rank 0's early reply must reach the driver while the node's other ranks still wait
    for it in a collective (the relay passes replies on without waiting for the slowest)."""
    stop = late(group, monkeypatch)
    relays = Relays(relay_from=1) if relayed else None
    try:
        outcome = run_chunk(
            group.members,
            UNTIL,
            hang_after_s=60.0,
            deadline_s=120.0,
            release_s=10.0,
            stop=stop,
            relays=relays,
        )
        assert relays is None or relays.assigned  # the chunk went through the relay
    finally:
        if relays is not None:
            relays.shutdown()

    assert not outcome.failed(), outcome.results
    assert outcome.stop_step is not None and 3 <= outcome.stop_step < UNTIL
    assert {rank: r["step"] for rank, r in outcome.results.items()} == dict.fromkeys(
        range(3), outcome.stop_step
    )
    # Each rank's reply covers every step of the chunk, the ones run to catch up included.
    assert all(len(r["losses"]) == outcome.stop_step for r in outcome.results.values())
    # Nobody is left inside a collective: the same group trains on together.
    monkeypatch.undo()
    for member in group.members:
        ray.get(member.stop_after.remote(UNTIL))
    after = run_chunk(
        group.members, outcome.stop_step + 2, hang_after_s=60.0, deadline_s=120.0, release_s=10.0
    )
    assert not after.failed(), after.results
    assert [r["step"] for r in after.results.values()] == [outcome.stop_step + 2] * 3


def test_ranks_train_on_past_a_chunk_end_and_a_stop_brings_them_to_one_step(group: WorkerGroup) -> None:
    """With ``ahead``, each rank goes on training once it replied, without a call (no rank waits for the
    driver's round trip); the next chunk's reply holds exactly that chunk's steps, and a stop asked while
    they train on (the driver's halt) ends with every rank idle at one step, the steps since the last chunk
    in one reply each — and the group trains on together."""
    limits = {"hang_after_s": 60.0, "deadline_s": 120.0, "release_s": 10.0}
    first = run_chunk(group.members, 2, ahead=UNTIL, every=2, **limits)
    assert not first.failed(), first.results
    assert [(r["step"], len(r["losses"])) for r in first.results.values()] == [(2, 2)] * 3
    _wait_until(lambda: min(_progress(m)["step"] for m in group.members) >= 5, "the ranks training on")
    second = run_chunk(group.members, 4, ahead=UNTIL, every=2, **limits)
    assert not second.failed(), second.results
    assert [(r["step"], len(r["losses"])) for r in second.results.values()] == [(4, 2)] * 3

    halted = run_chunk(group.members, UNTIL, stop=lambda: True, **limits)
    assert not halted.failed(), halted.results
    stop = halted.stop_step
    assert stop is not None and 5 <= stop < UNTIL
    assert [(r["step"], len(r["losses"])) for r in halted.results.values()] == [(stop, stop - 4)] * 3
    assert all(_stopped(m, stop) and _progress(m)["step"] == stop for m in group.members)

    after = run_chunk(group.members, stop + 2, **limits)
    assert not after.failed(), after.results
    assert [(r["step"], len(r["losses"])) for r in after.results.values()] == [(stop + 2, 2)] * 3
