"""A group of one (``cluster.mode=process``): the run's only worker, in the driver's own process, no Ray.

The controller drives it as it drives a Ray worker group — the same chunks, heartbeats, hang detection,
probes, checkpoint cadence, restore, preemption and endings — through the same calls
(:mod:`trainer.cluster.calls`): its member is a :class:`~trainer.cluster.actor.WorkerActor` reached by
:class:`~trainer.cluster.calls.InProcess`. What a group of one does not have is the plumbing of several
processes: no placement group, no process group to join at world size one, no warm spares, no relays. A
member it cannot keep (stopped as hung) is not replaced in place: the policy's restart starts a new group of
one from the newest state, as it would start a new Ray group.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from trainer.cluster import calls
from trainer.cluster.actor import WorkerActor
from trainer.config import Config, to_container
from trainer.devices import DeviceAdapter
from trainer.errors import CheckpointWriteError, DeviceUnavailableError
from trainer.faults import WorkerFaults


class OneProcess:
    """The :class:`~trainer.cluster.group.WorkerGroup` surface the controller uses, for one in-process member."""

    def __init__(self, config: Config, adapter: DeviceAdapter, arm_faults: bool = False) -> None:
        """``arm_faults``: the injected hang and slow-device faults may fire (the run's first group only).
        Kill faults are refused for a group of one at validation: its member is the driver's process."""
        self.config = config
        self.adapter = adapter
        self.arm_faults = arm_faults
        self.size = 1
        self.incarnation = 0
        self.members: list[Any] = []
        #: A group of one keeps no warm spare (one would be a second model in the driver's memory).
        self.spares: list[Any] = []
        self.spares_short: str | None = None
        #: Where its member runs (pid, host): this process.
        self.started_on: list[dict[str, Any]] = []

    def start(self) -> None:
        if not self.adapter.is_available():
            raise DeviceUnavailableError(
                f"device family {self.adapter.name!r} is not available in this process"
            )
        member = WorkerActor(to_container(self.config), 1, own_process=False)
        # Installed from outside, as a Ray group's join does: the worker's seams call them.
        member.worker.faults = WorkerFaults(self.config, self.adapter.name, 0, 0, armed=self.arm_faults)
        self.members = [calls.InProcess(member, name="worker")]
        self.started_on = [{"pid": os.getpid(), "host": socket.gethostname(), "nice": os.nice(0)}]

    def form(self, timeout_s: float) -> list[int]:
        """A new incarnation: at world size one there is no process group to join; returns the member's step."""
        self.incarnation += 1
        return [int(calls.get(self.members[0].info.remote())["step"] or 0)]

    def live_steps(self, timeout_s: float = 10.0) -> dict[int, int | None]:
        """Rank → step held, for a member that still answers (a stopped one does not)."""
        try:
            return {0: calls.get(self.members[0].info.remote(), timeout=timeout_s)["step"]}
        except calls.call_errors():
            return {}

    def leave_all(self, actors: list[Any]) -> None:
        """Nothing to leave: a group of one has no process group."""

    def replace(self, ranks: tuple[int, ...]) -> None:
        raise DeviceUnavailableError("a group of one keeps no spare to replace its member with")

    def refill_spares(self, timeout_s: float = 1.0) -> int:
        return 0

    def kill(self, ranks: list[int]) -> None:
        for rank in ranks:
            calls.kill(self.members[rank])

    def shutdown(self) -> None:
        """The member takes no more calls, and its training thread and background writer stop (a Ray
        actor's end with its process; this one's would live on in the driver's)."""
        for member in self.members:
            calls.kill(member)
            member.target.stretch.close()
            if member.target.checkpointer is not None:
                with contextlib.suppress(CheckpointWriteError):  # journalled when the save was settled
                    member.target.checkpointer.close()
