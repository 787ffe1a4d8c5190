"""The driver-side controller: an explicit state machine over a Ray worker group.

``run()`` is ``while not terminal: state = handler[state]()``. Workers train in chunks of steps; every
chunk's reply is a heartbeat, and every failure becomes a :class:`~trainer.policy.FailureEvent` that
:func:`~trainer.policy.decide` turns into a decision this class carries out.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import ray

from trainer.cluster.group import WorkerGroup
from trainer.config import Config
from trainer.devices import get_adapter
from trainer.errors import ExitCode
from trainer.journal import Journal
from trainer.policy import Action, Budget, Decision, FailureEvent, FailureKind, decide

log = logging.getLogger(__name__)


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (State.FINISHED, State.ABORTED)


@dataclass
class ChunkOutcome:
    """What each rank said about one chunk: a heartbeat, a collective error, death, or silence."""

    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)

    def failed(self) -> bool:
        return bool(self.lost or self.late or any(not r["ok"] for r in self.results.values()))


class Controller:
    def __init__(
        self, config: Config, run_dir: Path, checkpoint_root: Path, journal: Journal, driver_host: str
    ):
        self.config = config
        self.run_dir = run_dir
        self.checkpoint_root = checkpoint_root
        self.journal = journal
        self.adapter = get_adapter(config.device.family)
        self.group = WorkerGroup(config, self.adapter, driver_host)
        self.state = State.STARTING
        self.step = 0
        self.last_saved = -1
        self.step_times: list[float] = []
        self.failures: list[FailureEvent] = []
        self.pending: tuple[Decision, ChunkOutcome] | None = None
        self.last_loss = float("nan")
        self.failure_time: float | None = None
        self.recoveries: list[dict[str, Any]] = []
        self._handlers: dict[State, Callable[[], State]] = {
            State.STARTING: self._start,
            State.RUNNING: self._run_chunk,
            State.RECOVERING: self._recover,
        }

    def run(self) -> ExitCode:
        try:
            while not self.state.terminal:
                self.state = self._handlers[self.state]()
        finally:
            self.group.shutdown()
        return ExitCode.FINISHED if self.state is State.FINISHED else ExitCode.ABORTED

    # --- states --------------------------------------------------------------------------------------
    def _start(self) -> State:
        self.group.start()
        self.group.form(self._collective_timeout())
        keep = self.config.checkpoint.keep_last
        restored = ray.get([m.restore.remote(str(self.checkpoint_root), keep) for m in self.group.members])
        if restored[0] is not None:
            self.step = self.last_saved = int(restored[0]["step"])
            for path, why in restored[0]["skipped"]:
                self.journal.record("checkpoint_skipped", path=path, reason=why)
            self.journal.record("resumed", **{k: v for k, v in restored[0].items() if k != "skipped"})
            print(f"resumed from {restored[0]['path']} at step {self.step}")
        self.journal.record(
            "group_started",
            family=self.adapter.name,
            world_size=self.group.size,
            step=self.step,
            incarnation=self.group.incarnation,
        )
        return State.RUNNING

    def _run_chunk(self) -> State:
        total = self.config.train.steps
        if self.step >= total:
            return self._finish()
        until = min(total, self.step + self.config.cluster.chunk_steps)
        interval = self.config.checkpoint.interval_steps
        if interval:
            until = min(until, (self.step // interval + 1) * interval)
        outcome = self._train_until(until)
        if outcome.failed():
            return self._on_failure(outcome)
        self._on_heartbeat(outcome, until)
        if interval and self.step % interval == 0 and self.step < total:
            self._save()
        return State.RUNNING

    def _recover(self) -> State:
        assert self.pending is not None
        decision, outcome = self.pending
        self.pending = None
        started = time.monotonic()
        gone = set(outcome.lost) | set(outcome.late) | set(decision.ranks)
        alive = {rank: r for rank, r in outcome.results.items() if rank not in gone}
        self.group.leave_all([self.group.members[r] for r in alive])
        self.group.replace(tuple(sorted(gone)))
        if alive:
            source_rank = max(alive, key=lambda r: alive[r]["step"])
            snap = self.group.members[source_rank].snapshot.remote()
            steps = ray.get([m.load_snapshot.remote(snap, rank) for rank, m in enumerate(self.group.members)])
            origin = f"peer snapshot from rank {source_rank}"
        else:
            keep = self.config.checkpoint.keep_last
            restored = ray.get(
                [m.restore.remote(str(self.checkpoint_root), keep) for m in self.group.members]
            )
            steps = [r["step"] if r else 0 for r in restored]
            origin = "disk checkpoint" if restored[0] else "initial state (no checkpoint yet)"
        self.step = int(steps[0])
        self.group.form(self._collective_timeout())
        entry = {
            "step": self.step,
            "replaced_ranks": sorted(gone),
            "state_from": origin,
            "recover_s": time.monotonic() - started,
            "incarnation": self.group.incarnation,
        }
        self.recoveries.append(entry)
        self.journal.record("recovered", **entry)
        print(f"recovered at step {self.step} from {origin}; replaced ranks {sorted(gone)}")
        return State.RUNNING

    def _finish(self) -> State:
        eval_loss = float(ray.get(self.group.members[0].evaluate.remote()))
        if self.last_saved != self.step:
            self._save({"eval_loss": eval_loss})
        self._committed(ray.get(self.group.members[0].flush.remote()))
        self.journal.record(
            "run_finished",
            step=self.step,
            loss=self.last_loss,
            eval_loss=eval_loss,
            recoveries=len(self.recoveries),
        )
        print(f"finished at step {self.step}: loss {self.last_loss:.4f}, held-out loss {eval_loss:.4f}")
        return State.FINISHED

    # --- helpers -------------------------------------------------------------------------------------
    def _train_until(self, until: int) -> ChunkOutcome:
        refs = {m.train.remote(until): rank for rank, m in enumerate(self.group.members)}
        ready, not_ready = ray.wait(
            list(refs), num_returns=len(refs), timeout=self._deadline(until - self.step)
        )
        outcome = ChunkOutcome(late=sorted(refs[r] for r in not_ready))
        for ref in ready:
            rank = refs[ref]
            try:
                outcome.results[rank] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                log.warning("rank %d lost: %s", rank, exc)
                outcome.lost.append(rank)
        return outcome

    def _on_heartbeat(self, outcome: ChunkOutcome, until: int) -> None:
        first = outcome.results[0]
        self.step_times.extend(first["step_times"])
        losses = [
            statistics.fmean(r["losses"][i] for r in outcome.results.values())
            for i in range(len(first["losses"]))
        ]
        if losses:
            self.last_loss = losses[-1]
        if self.failure_time is not None:
            self.journal.record(
                "first_step_after_recovery", step=until, kill_to_step_s=time.monotonic() - self.failure_time
            )
            self.failure_time = None
        self.step = until
        log_every = self.config.train.log_interval
        for offset, loss in enumerate(losses):
            step = until - len(losses) + offset + 1
            if step % log_every == 0 or step == self.config.train.steps:
                print(
                    f"step {step}/{self.config.train.steps}  loss {loss:.4f}  "
                    f"({self.adapter.name} x{self.group.size})"
                )

    def _on_failure(self, outcome: ChunkOutcome) -> State:
        self.failure_time = time.monotonic()
        if outcome.lost:
            kind, ranks = FailureKind.WORKER_LOST, tuple(outcome.lost)
        elif outcome.late:
            kind, ranks = FailureKind.DEADLINE, tuple(outcome.late)
        else:
            kind, ranks = FailureKind.COLLECTIVE_FAILED, ()
        detail = "; ".join(f"rank {r}: {res['error']}" for r, res in outcome.results.items() if not res["ok"])
        event = FailureEvent(kind, ranks, self.step, self.adapter.name, time.time(), detail[:1000])
        self.failures.append(event)
        decision = decide(self.failures, Budget(self.config.cluster.max_restarts))
        self.journal.record(
            "failure", kind=kind.value, ranks=list(ranks), step=self.step, detail=event.detail
        )
        self.journal.record(
            "decision", action=decision.action.value, reason=decision.reason, ranks=list(decision.ranks)
        )
        print(
            f"failure: {kind.value} on ranks {list(ranks)} near step {self.step}; decision: {decision.reason}"
        )
        if decision.action is Action.ABORT:
            self.journal.record("run_aborted", step=self.step, reason=decision.reason)
            return State.ABORTED
        self.pending = (decision, outcome)
        return State.RECOVERING

    def _save(self, metrics: dict[str, float] | None = None) -> None:
        """Rank 0 stages a checkpoint (replicas hold the same state); it commits in the background."""
        keep = self.config.checkpoint.keep_last
        reply = ray.get(self.group.members[0].save.remote(str(self.checkpoint_root), keep, metrics))
        self._committed(reply["committed"])
        self.last_saved = self.step
        self.journal.record("checkpoint_started", step=self.step, blocking_s=reply["blocking_s"])

    def _committed(self, path: str | None) -> None:
        if path is not None:
            self.journal.record("checkpoint_saved", path=path, step=int(Path(path).name[5:14]))

    def _median_step_s(self) -> float | None:
        recent = self.step_times[-50:]
        return statistics.median(recent) if recent else None

    def _deadline(self, steps: int) -> float:
        cluster = self.config.cluster
        median = self._median_step_s()
        if median is None:
            return cluster.deadline_floor_s
        return max(cluster.deadline_factor * median * steps, cluster.deadline_floor_s)

    def _collective_timeout(self) -> float:
        """Collective timeout for the next incarnation: a multiple of the measured step time, not minutes."""
        median = self._median_step_s()
        floor = self.config.cluster.deadline_floor_s
        return floor if median is None else max(floor, self.config.cluster.deadline_factor * 10 * median)
