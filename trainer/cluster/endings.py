"""How a group run ends, other than by a decision of the policy: finished, failed (its final checkpoint
could not be written), stopped by a signal (preemption), stopped because another driver took the run over,
or stopped by a bug in the user's code — each recorded by :mod:`trainer.lifecycle`.

A part of :class:`~trainer.cluster.controller.Controller` kept in a file of its own; the attributes below are
the controller's.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from trainer.checkpoint.lease import Lease
from trainer.cluster import calls
from trainer.cluster.run_control import State
from trainer.cluster.saves import Saves
from trainer.cluster.watch import ChunkOutcome
from trainer.errors import ExitCode, UserCodeError
from trainer.journal import Journal
from trainer.lifecycle import record_failed, record_finished, record_lease_lost, record_user_error
from trainer.metrics import MetricsSink
from trainer.preemption import Preemption, record_preempted
from trainer.progress import Progress

if TYPE_CHECKING:
    from trainer.cluster.group import WorkerGroup
    from trainer.cluster.one_process import OneProcess


class RunEndings:
    journal: Journal
    sink: MetricsSink
    saves: Saves
    progress: Progress
    preemption: Preemption
    lease: Lease | None
    group: WorkerGroup | OneProcess | None
    state: State
    step: int
    family: str
    families_used: list[str]
    recoveries: list[dict[str, Any]]
    last_loss: float
    abort_reason: str
    user_error: str | None
    #: The run trained to its end but its final checkpoint could not be written: ExitCode.FAILED.
    final_failed: str | None = None

    @property
    def members(self) -> list[Any]:
        assert self.group is not None
        return self.group.members

    def exit_code(self) -> ExitCode:
        """How the run ended, once its state is terminal."""
        if self.user_error is not None:
            return ExitCode.USER_ERROR
        if self.state is State.PREEMPTED:
            return ExitCode.PREEMPTED
        if self.state is State.FINISHED:
            return ExitCode.FINISHED
        return ExitCode.FAILED if self.final_failed is not None else ExitCode.ABORTED

    def _finish(self) -> State:
        self.progress.close()
        eval_loss, totals, failed = self.saves.finish(self.saves.writers(self.members), self.step)
        if failed is not None:
            self.final_failed = failed
            record_failed(self.journal, self.step, failed)
            return State.ABORTED
        recoveries = len(self.recoveries)
        record_finished(
            self.journal,
            self.sink,
            self.step,
            self.last_loss,
            eval_loss,
            self.families_used,
            recoveries,
            totals,
        )
        return State.FINISHED

    def _preempted(self, outcome: ChunkOutcome | None = None, saveable: bool = True) -> State:
        """Commit the step in flight (within the grace period) and stop: a signal asked for it."""
        writers, why = [], f"the run was {self.state.value.replace('_', ' ')}, not training"
        if outcome is not None:  # the chunk stopped every rank after one step; save from one that did
            done = {r: res["step"] for r, res in outcome.results.items() if res["ok"]}
            why = "a worker failed while the ranks stopped"
            if done and not outcome.failed():
                self.step = max(done.values())
                writers = self.saves.writers(self.members, min(r for r, s in done.items() if s == self.step))
        elif saveable and self.group is not None:
            writers = self.saves.writers(self.members)
        timeout = self.preemption.left_s()
        saved, why = self.saves.final(writers, self.step, timeout) if writers else (None, why)
        record_preempted(self.journal, self.preemption, self.step, saved, why)
        return State.PREEMPTED

    def _lease_lost(self) -> State:
        """Another driver took the run over (this one was paused past the lease's staleness): stop; its
        saves are refused by the fence anyway."""
        self.abort_reason = record_lease_lost(self.journal, self.step)
        return State.ABORTED

    def _on_user_error(self, exc: UserCodeError) -> State:
        """The user's code raised on a worker: stop now. Not an event for the policy — a retry or another
        family would raise it again — and the newest checkpoint stays as it is (a save in flight commits)."""
        message = str(getattr(exc, "cause", exc))  # Ray's wrapper holds the worker's error as its cause
        self.user_error = message

        def settle() -> None:
            with contextlib.suppress(*calls.call_errors()):
                if self.group is not None:
                    self.saves.flush(self.members[0], self.step, timeout_s=60)

        record_user_error(self.journal, self.step, self.family, message, settle)
        return State.ABORTED
