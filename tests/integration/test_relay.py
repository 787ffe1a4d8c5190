"""Per-node relays on a real local Ray: the chunk watcher reaches a node's members through one relay actor
and still sees each member's reply, loss and error as it would calling them directly.

The members here are small Ray actors with a worker's call surface (train, progress, info), so that a
member can be made slow, killed or made to raise at will; the relay and the watcher are the real ones.
The relay path over real gloo workers runs in test_many_workers.py (4 workers on one node are relayed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from trainer.cluster.relay import Relays, progress_of
from trainer.cluster.watch import run_chunk
from trainer.errors import UserCodeError

pytestmark = pytest.mark.usefixtures("local_ray")

SIZE = 5


@ray.remote(num_cpus=0, max_concurrency=4)
class Rank:
    """Trains for ``step_s`` per chunk; or raises as the user's code would."""

    def __init__(self) -> None:
        self.step_s, self.raises, self.step = 0.05, False, 0

    def behave(self, step_s: float, raises: bool = False) -> None:
        self.step_s, self.raises = step_s, raises

    def info(self) -> dict[str, Any]:
        return {"node": ray.get_runtime_context().get_node_id()}

    def train(self, until: int) -> dict[str, Any]:
        if self.raises:
            raise UserCodeError("the task's loss raised: KeyError('labels')")
        time.sleep(self.step_s)
        self.step = until
        return {"ok": True, "step": until, "losses": [1.0], "step_times": [self.step_s]}

    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "phase": "idle", "since": time.time()}

    def release(self) -> int:
        """Asked of the ranks still training once a peer failed; there is no group to shut down here."""
        return 0


@pytest.fixture(scope="module")
def relays() -> Iterator[Relays]:
    made = Relays()
    yield made
    made.shutdown()


@pytest.fixture(scope="module")
def started() -> list[Any]:
    """The members, started once for the module (a process each); a test that kills one replaces it."""
    return [Rank.remote() for _ in range(SIZE)]  # type: ignore[attr-defined]


def _members(started: list[Any], *step_s: float, raises: int | None = None) -> list[Any]:
    """The members, each taking ``step_s[rank]`` per chunk (the last value for the rest); ``raises``: the
    rank whose train raises."""
    times = [step_s[min(rank, len(step_s) - 1)] for rank in range(SIZE)]
    ray.get(
        [m.behave.remote(t, rank == raises) for rank, (m, t) in enumerate(zip(started, times, strict=True))]
    )
    return list(started)


def _chunk(members: list[Any], relays: Relays, until: int = 1) -> Any:
    return run_chunk(members, until, hang_after_s=60.0, deadline_s=60.0, release_s=10.0, relays=relays)


def test_a_node_with_several_members_is_reached_through_one_relay(relays: Relays, started: list[Any]) -> None:
    members = _members(started, 0.05)
    outcome = _chunk(members, relays)

    assert not outcome.failed() and sorted(outcome.results) == list(range(SIZE))
    routes = relays.routes(members)
    assert [ranks for _, ranks in routes.relayed] == [list(range(SIZE))] and routes.direct == []
    assert sorted(progress_of(members, list(range(SIZE)), routes)) == list(range(SIZE))
    # A new member (a replacement) is told to the node's relay before the next chunk.
    members[1], members[2] = members[2], members[1]
    again = _chunk(members, relays, until=2)
    assert {rank: reply["step"] for rank, reply in again.results.items()} == dict.fromkeys(range(SIZE), 2)
    assert relays.assigned[next(iter(relays.assigned))][1] == members[1]


def test_a_member_killed_during_a_chunk_is_reported_lost_and_the_others_reply(
    relays: Relays, started: list[Any]
) -> None:
    members = _members(started, 1.0)
    _chunk(members, relays)  # the relay is up and knows the members
    ray.kill(members[3], no_restart=True)
    outcome = _chunk(members, relays, until=2)
    started[3] = Rank.remote()  # type: ignore[attr-defined]

    assert outcome.lost == [3]
    assert sorted(outcome.results) == [0, 1, 2, 4]


def test_a_dead_relay_takes_its_ranks_with_it_and_is_started_again(
    relays: Relays, started: list[Any]
) -> None:
    members = _members(started, 0.5)
    _chunk(members, relays)
    (relay,) = relays.relays.values()
    ray.kill(relay, no_restart=True)
    assert _chunk(members, relays, until=2).lost == list(range(SIZE))
    assert not _chunk(members, relays, until=3).failed()


def test_the_users_error_reaches_the_driver_as_its_own(relays: Relays, started: list[Any]) -> None:
    members = _members(started, 0.05, raises=SIZE - 1)
    with pytest.raises(UserCodeError) as raised:
        _chunk(members, relays)
    # Ray's wrapper holds the worker's error as its cause, as with a direct call (not the relay's wrapper).
    assert "KeyError('labels')" in str(raised.value.cause)  # type: ignore[attr-defined]
    assert "Relay" not in str(raised.value.cause)  # type: ignore[attr-defined]


def test_a_reply_is_passed_on_without_waiting_for_the_slowest_member(
    relays: Relays, started: list[Any]
) -> None:
    """A rank that stopped early must reach the driver while its node's others still train (a stop request
    that reached them one by one): the relay returns one poll after the first reply, and the rest later."""
    members = _members(started, 0.0, 3.0)
    routes = relays.routes(members)
    ((relay, _),) = routes.relayed
    first = ray.get(relay.train.remote(1, 0.25), timeout=30)
    assert sorted(first) == [0]
    rest: dict[int, Any] = {}
    while len(rest) < SIZE - 1:
        rest.update(ray.get(relay.more.remote(0.25), timeout=30))
    assert sorted(rest) == list(range(1, SIZE))
