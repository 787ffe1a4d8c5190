"""The driver's seam over member calls (``trainer.cluster.calls``): a Ray actor and an in-process member
answer the same calls with the same replies through ``get``/``wait``/``kill``, errors included, and a call is
answered while another runs (as ``progress()`` while ``train()`` runs)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import ray

from trainer.cluster import calls

pytestmark = pytest.mark.usefixtures("local_ray")


def _member_class() -> type:
    """A member's class, made here so that Ray ships it by value (a test module is not importable by
    Ray's workers)."""

    class Counter:
        """A member: a long call that waits for a go-ahead, quick calls answered meanwhile, an error."""

        def __init__(self) -> None:
            self.count = 0
            self.go = threading.Event()

        def add(self, n: int) -> int:
            self.count += n
            return self.count

        def hold(self, seconds: float) -> str:
            """Runs until :meth:`release` (or ``seconds``): the long call."""
            return "released" if self.go.wait(seconds) else "timed out"

        def release(self) -> int:
            self.go.set()
            return self.count

        def double(self, n: int) -> int:
            return 2 * n

        def pair(self) -> tuple[int, str]:
            return self.count, "pair"

        def fail(self) -> None:
            raise KeyError("no such thing")

    return Counter


Counter = _member_class()


def _ray_member() -> Any:
    return ray.remote(max_concurrency=4, num_cpus=0)(Counter).remote()


def _local_member() -> calls.InProcess:
    return calls.InProcess(Counter())


@pytest.mark.parametrize("make", [_ray_member, _local_member], ids=["ray", "in-process"])
def test_the_same_calls_get_the_same_replies(make: Any) -> None:
    member = make()
    assert calls.get(member.add.remote(2), timeout=30) == 2
    # Replies in the order of the calls (which may run at the same time: both members are threaded).
    assert calls.get([member.double.remote(3), member.double.remote(4)], timeout=30) == [6, 8]
    # A reference passed as an argument is resolved first, as Ray does.
    assert calls.get(member.add.remote(member.add.remote(0)), timeout=30) == 4
    first, second = member.pair.options(num_returns=2).remote()
    assert calls.get([first, second], timeout=30) == [4, "pair"]
    # The member's own error reaches the caller (Ray wraps it in a class deriving from it).
    with pytest.raises(KeyError, match="no such thing"):
        calls.get(member.fail.remote(), timeout=30)


@pytest.mark.parametrize("make", [_ray_member, _local_member], ids=["ray", "in-process"])
def test_a_call_is_answered_while_a_long_one_runs_and_wait_sees_which_are_done(make: Any) -> None:
    member = make()
    calls.get(member.add.remote(0), timeout=30)  # started
    long = member.hold.remote(60.0)
    quick = member.add.remote(1)
    done, pending = calls.wait([long, quick], num_returns=2, timeout=2.0)
    assert done == [quick] and pending == [long]  # the quick one came back while the long one runs
    with pytest.raises(TimeoutError):
        calls.get(long, timeout=0.2)
    assert calls.get(member.release.remote(), timeout=30) == 1
    done, pending = calls.wait([long], num_returns=1, timeout=30)
    assert done == [long] and pending == []
    assert calls.get(long) == "released"


@pytest.mark.parametrize("make", [_ray_member, _local_member], ids=["ray", "in-process"])
def test_a_killed_member_answers_no_more_and_its_error_is_a_lost_one(make: Any) -> None:
    member = make()
    assert calls.get(member.add.remote(1), timeout=30) == 1
    running = member.hold.remote(60.0)
    calls.get(member.add.remote(0), timeout=30)  # answered meanwhile: the long call has started
    calls.kill(member)
    with pytest.raises(calls.lost_errors()):  # a call in flight fails too, as Ray fails a killed actor's
        calls.get(running, timeout=30)
    deadline = time.monotonic() + 30
    with pytest.raises(calls.lost_errors()):
        while time.monotonic() < deadline:  # Ray's kill lands asynchronously
            calls.get(member.add.remote(1), timeout=30)
            time.sleep(0.1)
    assert issubclass(calls.MemberLost, calls.call_errors())


def test_one_wait_over_both_kinds_of_member_is_refused() -> None:
    with pytest.raises(TypeError, match="mixes in-process and Ray members"):
        calls.wait([_ray_member().add.remote(1), _local_member().add.remote(1)])
