"""How the driver reaches its members: one seam over the calls, whatever carries them.

A member is reached as a Ray actor is — ``member.method.remote(*args)`` returns a reference to the reply —
and the driver's modules take the replies in through this module alone: :func:`get`, :func:`wait`,
:func:`kill`, and the errors of :func:`lost_errors` (the member is gone) and :func:`call_errors` (the call
did not answer). Two kinds of member answer these calls:

* a Ray actor handle (the worker group): calls and replies go through Ray, as they always did;
* :class:`InProcess`, an object living in the driver's own process (a group of one): each call runs on a
  thread of its own — as a threaded Ray actor answers ``progress()`` while ``train()`` runs — and its
  reference is a :class:`concurrent.futures.Future`.

Ray is imported only when a Ray reference is met, so a driver whose members are all in-process never
imports it. No Ray error can come from a process that never imported Ray, which is what the error tuples
rely on.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any


class MemberLost(RuntimeError):
    """An in-process member was stopped (:func:`kill`): its calls no longer answer."""


class InProcess:
    """A member object in this process, called as a Ray actor is: ``handle.method.remote(*args)`` runs
    ``target.method(*args)`` on a thread of its own and returns a Future of its reply, so a call is answered
    while another runs (as the threaded worker actor answers ``progress()`` while ``train()`` runs); a Future
    among the arguments is replaced by its result first (as Ray resolves a reference passed to a call).

    The threads are daemons: a call that never returns (a hung step) does not hold the driver's exit."""

    def __init__(self, target: Any, name: str = "member") -> None:
        self.target = target
        self.name = name
        self.lost = threading.Event()
        self._lock = threading.Lock()
        #: Calls not answered yet: a stop fails them, as a killed actor's pending calls fail.
        self._inflight: set[Future[Any]] = set()

    def __getattr__(self, method: str) -> _Method:
        if method.startswith("_") or not callable(getattr(self.target, method, None)):
            raise AttributeError(f"{type(self.target).__name__} has no method {method!r} to call")
        return _Method(self, method)

    def submit(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], returns: int) -> Any:
        reply: Future[Any] = Future()
        with self._lock:
            if self.lost.is_set():
                reply.set_exception(MemberLost(f"the in-process member was stopped; {method}() not called"))
            else:
                self._inflight.add(reply)
                threading.Thread(
                    target=self._answer,
                    args=(reply, method, args, kwargs),
                    name=f"{self.name}.{method}",
                    daemon=True,
                ).start()
        return reply if returns == 1 else _split(reply, returns)

    def _answer(self, reply: Future[Any], method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        result, error = None, None
        try:
            resolved = [a.result() if isinstance(a, Future) else a for a in args]
            result = getattr(self.target, method)(*resolved, **kwargs)
        except BaseException as exc:  # the call's error, handed to whoever takes its reply
            error = exc
        with self._lock:
            if reply not in self._inflight:  # failed by a stop meanwhile: the answer is dropped
                return
            self._inflight.discard(reply)
            if error is not None:
                reply.set_exception(error)
            else:
                reply.set_result(result)

    def stop(self) -> None:
        """No more calls are taken, and the calls not answered yet fail with :class:`MemberLost`, as a killed
        actor's do. A call running now runs on in its thread (a thread cannot be stopped from outside);
        its answer is dropped."""
        with self._lock:
            self.lost.set()
            for reply in self._inflight:
                reply.set_exception(MemberLost("the in-process member was stopped while this call ran"))
            self._inflight.clear()


class _Method:
    def __init__(self, member: InProcess, name: str, returns: int = 1) -> None:
        self.member, self.name, self.returns = member, name, returns

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.member.submit(self.name, args, kwargs, self.returns)

    def options(self, num_returns: int = 1) -> _Method:
        return _Method(self.member, self.name, num_returns)


def _split(reply: Future[Any], count: int) -> list[Future[Any]]:
    """``count`` Futures, one per item of the tuple ``reply`` resolves to (``options(num_returns=count)``)."""
    parts: list[Future[Any]] = [Future() for _ in range(count)]

    def done(f: Future[Any]) -> None:
        error = f.exception()
        for i, part in enumerate(parts):
            if error is not None:
                part.set_exception(error)
            else:
                part.set_result(f.result()[i])

    reply.add_done_callback(done)
    return parts


def _in_process(refs: Sequence[Any]) -> bool:
    """Whether these references are in-process Futures (all of them) or Ray's (none of them)."""
    local = [isinstance(r, Future) for r in refs]
    if any(local) and not all(local):
        raise TypeError("one call mixes in-process and Ray members; a group's members are all of one kind")
    return bool(local) and all(local)


def get(refs: Any, timeout: float | None = None) -> Any:
    """The reply of one reference, or the replies of a list of them; raises the call's own error, one of
    :func:`lost_errors` when the member is gone, or :class:`TimeoutError` after ``timeout`` seconds."""
    many = isinstance(refs, list)
    batch = refs if many else [refs]
    if not _in_process(batch):
        import ray

        return ray.get(refs, timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies = []
    for ref in batch:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        replies.append(ref.result(timeout=left))
    return replies if many else replies[0]


def wait(
    refs: list[Any], num_returns: int = 1, timeout: float | None = None, fetch_local: bool = True
) -> tuple[list[Any], list[Any]]:
    """Those of ``refs`` that are ready (up to ``num_returns``, once that many are, or when ``timeout``
    runs out) and the others, in their order; as ``ray.wait``."""
    if not _in_process(refs):
        import ray

        return ray.wait(refs, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local)  # type: ignore[no-any-return]
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ready = [r for r in refs if r.done()]
        left = None if deadline is None else deadline - time.monotonic()
        if len(ready) >= num_returns or (left is not None and left <= 0):
            break
        wait_futures([r for r in refs if not r.done()], timeout=left, return_when=FIRST_COMPLETED)
    done = ready[:num_returns]
    return done, [r for r in refs if r not in done]


def kill(member: Any) -> None:
    """Stop a member for good: a Ray actor is killed (its process ends); an in-process member stops taking
    calls (:meth:`InProcess.stop`)."""
    if isinstance(member, InProcess):
        member.stop()
        return
    import ray

    ray.kill(member, no_restart=True)


def lost_errors(*more: type[Exception]) -> tuple[type[Exception], ...]:
    """What a call raises when its member is gone (a dead actor, its node's objects lost, a stopped
    in-process member), and ``more``."""
    ray = sys.modules.get("ray")
    if ray is None:
        return (MemberLost, *more)
    return (MemberLost, ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, *more)


def call_errors(*more: type[Exception]) -> tuple[type[Exception], ...]:
    """What a call raises when it did not answer — its member gone, a timeout, Ray's own errors — and
    ``more``."""
    ray = sys.modules.get("ray")
    if ray is None:
        return (MemberLost, TimeoutError, *more)
    return (MemberLost, TimeoutError, ray.exceptions.RayError, *more)
