"""What the parts of a group run share with the controller that drives it: the run's states, and the
controller's surface that a hand-over acts through.

The controller (:mod:`trainer.cluster.controller`) is the one place that carries out decisions; the
hand-over (:mod:`trainer.cluster.handover`) drives a run through its steps by the operations listed in
:class:`RunControl` — it depends on this interface, not on the controller module, so the import graph has
no circle.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from trainer.cluster.group import WorkerGroup
    from trainer.cluster.newest_state import HeldState, Loaded
    from trainer.cluster.one_process import OneProcess
    from trainer.cluster.saves import Saves
    from trainer.cluster.watch import ChunkOutcome
    from trainer.config import Config
    from trainer.journal import Journal
    from trainer.metrics import MetricsSink
    from trainer.policy import FailureKind


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    HANDING_OVER = "handing_over"
    FINISHED = "finished"
    ABORTED = "aborted"
    #: Stopped by a signal to the driver, the step in flight saved (see trainer.preemption).
    PREEMPTED = "preempted"

    @property
    def terminal(self) -> bool:
        return self in (State.FINISHED, State.ABORTED, State.PREEMPTED)


#: States whose whole duration is badput, and its bucket.
BADPUT_STATES = {State.STARTING: "startup", State.RECOVERING: "recovery", State.HANDING_OVER: "handover"}


class RunControl(Protocol):
    """The controller as a hand-over sees it."""

    config: Config
    journal: Journal
    sink: MetricsSink
    #: The family the run is on, and the step every member has completed.
    family: str
    step: int
    group: WorkerGroup | OneProcess | None
    #: Families the policy gave up on.
    given_up: set[str]
    #: The newest state taken from a live member while the group changes.
    held: HeldState | None
    saves: Saves

    @property
    def members(self) -> list[Any]: ...

    def launch(self, family: str, workers: int | None = None, form: bool = True) -> None:
        """Start a worker group on ``family`` (formed unless ``form`` is false)."""

    def hold_newest(self, steps: dict[int, int | None], evaluate: bool = False) -> HeldState | None:
        """Snapshot the most advanced live member (None where the state is sharded: no member holds it whole)."""

    def evaluate(self) -> float:
        """The held-out loss of the group's state (every member takes part where the state is sharded)."""

    def load_newest(self) -> Loaded:
        """Give the group the newest state; the run's step follows it."""

    def collective_timeout(self) -> float: ...

    def preflight(self) -> State:
        """A due parity check, then probes; the state the run goes on in."""

    def on_event(
        self, kind: FailureKind, ranks: tuple[int, ...], detail: str, outcome: ChunkOutcome | None = None
    ) -> State:
        """Record an event, ask the policy, return the state that carries out its decision."""
