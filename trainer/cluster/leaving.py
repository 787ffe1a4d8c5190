"""A worker asked to leave: SIGTERM to one worker's process (a node drain, a spot reclaim of one machine, a
Kubernetes eviction of one pod) is a planned removal, not a failure.

The worker notes the signal and keeps working: it publishes ``leaving`` in Ray's key-value store under its
actor id, and exits by itself only after ``checkpoint.preempt_grace_s`` if nobody acted on it (before the
orchestrator's SIGKILL). The controller sees the notice within a second, stops every rank after the step
in flight (as for the driver's own preemption), replaces the leaving rank from a spare with a peer's
snapshot of that very step — nothing is lost — and tells the policy ``worker_preempted``, which does not
count against the family or the restart budget. A worker that is gone before anyone noticed (the grace
too short, or Ray's node drain: ``ActorDiedError.preempted``) is replaced like a lost one, from the
newest snapshot, and is still not counted as a failure when its notice or Ray says it was preempted.

Ray workers of a threaded actor run calls off the main thread and never return to Python there, so a
Python signal handler would never run: the signal is seen through ``signal.set_wakeup_fd``, which the
interpreter's C-level handler writes to at once, read by a thread of this module.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from trainer.cluster.calls import InProcess

log = logging.getLogger(__name__)

_PREFIX = "fleet-trainer/leaving/"
_KEEP: list[socket.socket] = []


def _key(actor_id: str) -> bytes:
    return (_PREFIX + actor_id).encode()


def watch_terminate(grace_s: float) -> bool:
    """In a Ray actor's process: on SIGTERM, publish this actor's notice and exit after ``grace_s``.
    Returns False where it cannot be installed (not on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("SIGTERM is not watched in this worker: its constructor ran off the main thread")
        return False
    import ray

    actor_id = ray.get_runtime_context().get_actor_id()
    if actor_id is None:
        return False
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the C-level handler writes to the wakeup fd
    signal.set_wakeup_fd(writer.fileno())

    def watch() -> None:
        while True:
            data = reader.recv(64)
            if not data or signal.SIGTERM not in data:
                continue
            log.warning(
                "SIGTERM: this worker leaves (a planned removal); exiting in %.0f s at the latest", grace_s
            )
            try:
                from ray.experimental import internal_kv

                internal_kv._internal_kv_put(_key(actor_id), f"SIGTERM at {time.time():.3f}".encode())
            except Exception as exc:  # the notice is best effort; the loss is handled either way
                log.warning("could not publish the leaving notice: %s", exc)
            time.sleep(grace_s)
            os._exit(0)

    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()
    _KEEP.extend((reader, writer))  # both ends live as long as the process
    return True


def actor_id(member: Any) -> str:
    return str(member._actor_id.hex())


def leaving(members: list[Any]) -> list[int]:
    """Ranks of ``members`` whose workers published a leaving notice. An in-process member publishes none:
    a SIGTERM to its process is the driver's own preemption."""
    if not _notices_from(members):
        return []
    from ray.experimental import internal_kv

    try:
        keys = {
            k.decode() if isinstance(k, bytes) else str(k) for k in internal_kv._internal_kv_list(_PREFIX)
        }
    except Exception as exc:
        log.warning("could not read the leaving notices: %s", exc)
        return []
    ids = {_PREFIX + actor_id(m): rank for rank, m in enumerate(members)}
    return sorted(ids[k] for k in keys if k in ids)


def forget(members: list[Any]) -> None:
    """Drop the notices of ``members`` (replaced: their ids never come back)."""
    if not _notices_from(members):
        return
    from ray.experimental import internal_kv

    for member in members:
        try:
            internal_kv._internal_kv_del(_key(actor_id(member)))
        except Exception as exc:
            log.warning("could not drop a leaving notice: %s", exc)


class LeaveWatch:
    """The controller's view: are any of the current members leaving? Asked between chunks and from a chunk's
    wait loop, it reads Ray's key-value store at most once per ``every_s`` (or when the members changed)."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self._next = 0.0
        #: Ranks found leaving at the last look, and the members it looked at.
        self.ranks: list[int] = []
        self._looked_at: list[str] = []

    def __call__(self, members: list[Any]) -> bool:
        if not _notices_from(members):
            return False
        now = time.monotonic()
        ids = [actor_id(m) for m in members]
        # Another group than at the last look (a leaving rank was just replaced, often within the interval):
        # what was found then is about workers no longer here, so look again now.
        if now >= self._next or ids != self._looked_at:
            self._next, self._looked_at = now + self.every_s, ids
            self.ranks = leaving(members)
        return bool(self.ranks)


def _notices_from(members: list[Any]) -> bool:
    """Whether these members may publish leaving notices (Ray actors do; a group of one's member does not)."""
    return any(not isinstance(m, InProcess) for m in members)
