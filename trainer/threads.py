"""Torch work done outside a rank's training thread runs on a thread that ends with it.

Torch's CPU kernels run their parallel loops on OpenMP (GNU libgomp in the CPU wheels). Every thread that
runs one gets a team of worker threads of its own, kept for as long as that thread lives. While a process
holds more such threads than it has CPUs, libgomp cuts the time its workers spin waiting for the next
parallel loop from ~300,000 iterations to ~100: they sleep between loops and are woken for each one, and a
small model's many short loops pay that every time. A rank that uses all of its host's cores
(``device.num_threads``: the cores ÷ the ranks of the host) already has a full team on its training thread,
so one more team — the driver's main thread that tried the task's code before a group of one started, a
Ray actor's main thread that loaded initial weights in its set-up, a Ray pool thread that evaluated the
model — is enough to throttle it for the rest of the process's life. Measured on the 2-core host, one
worker of the ``gpt_tiny`` workload: 40-43 ms per step when only the training thread had a team, 48-49 ms
once another thread had one; a bare ``torch.softmax`` of 512 x 512 took 60 µs against 120 µs.

:func:`on_passing_thread` runs such work on a new thread and waits for it: the thread ends, and with it its
team, so the training thread keeps the only team the process has. Work that runs once per call and not per
step (set-up, a restore, an evaluation, a snapshot, a probe) pays a thread start (~0.1 ms) and a team
start — nothing beside the per-step cost it saves.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def on_passing_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` on a new thread, awaited: its value is returned, its exception raised here
    (with its traceback). Thread-local state set by ``fn`` — torch's grad mode, a CUDA current device — does
    not reach the caller; the toolkit keeps none across calls (its ranks train on a thread of their own)."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"passing:{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def passing_thread(method: Callable[P, R]) -> Callable[P, R]:
    """A method whose body runs :func:`on_passing_thread` (the torch work of a worker actor's calls, which
    Ray runs on pool threads that live as long as the actor)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return on_passing_thread(method, *args, **kwargs)

    return wrapper
