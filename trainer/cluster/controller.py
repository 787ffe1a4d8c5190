"""The driver-side controller: an explicit state machine over a Ray worker group.

``run()`` is ``while not terminal: state = handler[state]()``. Workers train in chunks of steps; each
chunk's replies are heartbeats. Every failure and health finding becomes a
:class:`~trainer.policy.FailureEvent`; :func:`~trainer.policy.decide` returns what to do and this class
carries it out: re-form the group, replace or exclude workers from warm spares, hand the run over to
another device family, or abort.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.checkpoint.lease import Lease
from trainer.cluster import calls
from trainer.cluster.deadlines import Deadlines
from trainer.cluster.handover import HandOver
from trainer.cluster.health_watch import HealthWatch
from trainer.cluster.leaving import LeaveWatch, leaving
from trainer.cluster.newest_state import HeldState
from trainer.cluster.one_process import OneProcess
from trainer.cluster.recovery import RunRecovery
from trainer.cluster.relay import Relays
from trainer.cluster.run_control import BADPUT_STATES, State
from trainer.cluster.saves import Saves, check_shared
from trainer.cluster.shard_copies import shard_copies_for
from trainer.cluster.watch import ChunkOutcome, run_chunk
from trainer.config import Config
from trainer.devices import get_adapter
from trainer.errors import DeviceUnavailableError, ExitCode, UserCodeError
from trainer.goodput import Goodput
from trainer.heartbeat import Heartbeat
from trainer.journal import Journal
from trainer.lifecycle import checkpoint_due, record_group
from trainer.metrics import MetricsSink, NullSink
from trainer.policy import Action, Decision, FailureEvent, FailureKind, PolicyConfig, decide
from trainer.preemption import Preemption
from trainer.progress import Progress

if TYPE_CHECKING:
    from trainer.cluster.group import WorkerGroup

log = logging.getLogger(__name__)

#: Seconds between checks that the warm spares are alive (one call per spare).
_SPARE_CHECK_S = 5.0


class Controller(RunRecovery):
    def __init__(
        self,
        config: Config,
        run_dir: Path,
        checkpoint_root: str,
        journal: Journal,
        driver_host: str,
        sink: MetricsSink | None = None,
        goodput: Goodput | None = None,
        preemption: Preemption | None = None,
        lease: Lease | None = None,
    ):
        self.config = config
        #: Set by SIGTERM/SIGINT to the driver (when installed): stop at the step in flight, save it, exit.
        self.preemption = preemption or Preemption(config.checkpoint.preempt_grace_s)
        #: Workers asked to leave (SIGTERM to one of them): seen from the chunk's wait loop.
        self.leave_watch = LeaveWatch()
        #: When the warm spares are next checked for life (monotonic seconds).
        self.next_spare_check = 0.0
        #: The backend timeouts last journalled (trainer.devices.timeouts.BackendTimeouts.to_dict()).
        self.last_backend_timeouts: dict[str, Any] | None = None
        self.sink = sink or NullSink()
        self.goodput = goodput or Goodput()
        self.run_dir = run_dir
        self.checkpoint_root = checkpoint_root
        self.journal = journal
        self.driver_host = driver_host
        self.family = get_adapter(config.device.family).name
        self.group: WorkerGroup | OneProcess | None = None
        #: One relay per node hosting several members: a chunk costs the driver one call per node.
        self.relays = Relays()
        self.progress = Progress(config.train.steps, config.train.log_interval)
        self.health = HealthWatch(config, journal, self.sink, self.goodput)
        self.handover = HandOver(self)
        self.state = State.STARTING
        self.step = 0
        #: The step the ranks train on towards after the last chunk (:meth:`next_fixed_point`); None: idle.
        self.ahead: int | None = None
        self.saves = Saves(config, checkpoint_root, journal, self.sink, self.goodput, self.progress)
        #: This driver's hold on the run (one driver per run); its fence goes with every save.
        self.lease = lease
        self.saves.fence = lease.fence if lease is not None else None
        self.deadlines = Deadlines(config.cluster, config.fault_tolerance, compiles=config.train.compile)
        self.events: list[FailureEvent] = []
        self.given_up: set[str] = set()
        self.families_used: list[str] = []
        self.pending: tuple[Decision, ChunkOutcome] | None = None
        #: The newest state taken from a live member while its group is being replaced (see newest_state).
        self.held: HeldState | None = None
        self.shard_copies = shard_copies_for(config, journal)
        self.last_loss = float("nan")
        self.failure_time: float | None = None
        self.recoveries: list[dict[str, Any]] = []
        self.abort_reason = ""
        #: The user's code raised: the run stops with ExitCode.USER_ERROR.
        self.user_error: str | None = None
        self._handlers: dict[State, Callable[[], State]] = {
            State.STARTING: self._start,
            State.RUNNING: self._run_chunk,
            State.RECOVERING: self._recover,
            State.HANDING_OVER: self.handover.run,
        }

    def run(self) -> ExitCode:
        try:
            while not self.state.terminal:
                if self.preemption.requested:  # between two states: the group holds the run at self.step
                    self.state = self._preempted(self._halt(), saveable=self.state is State.RUNNING)
                    break
                if self.lease is not None and self.lease.lost.is_set():
                    self.state = self._lease_lost()
                    break
                state, started = self.state, time.monotonic()
                try:
                    self.state = self._handlers[state]()
                except calls.lost_errors() as exc:
                    # A save, snapshot, restore, probe or hand-over step found a worker gone: a worker loss.
                    self.state = self._on_lost(exc)
                except UserCodeError as exc:
                    self.state = self._on_user_error(exc)
                if state in BADPUT_STATES:  # the whole state is unproductive (its probes included)
                    self.goodput.bad(BADPUT_STATES[state], time.monotonic() - started)
        finally:
            if self.group is not None:
                self.group.shutdown()
            self.relays.shutdown()
        return self.exit_code()

    # --- states --------------------------------------------------------------------------------------
    def _start(self) -> State:
        try:
            self.launch(self.family)
        except DeviceUnavailableError as exc:
            return self.on_event(FailureKind.FAMILY_UNAVAILABLE, (), str(exc))
        self.step = self.saves.restore(self.members, self.family)
        return self.preflight()

    def launch(self, family: str, workers: int | None = None, form: bool = True) -> None:
        """Start a worker group on ``family`` and (unless ``form`` is false) form its first incarnation.

        Injected kill/hang faults are armed in the run's first incarnation only, a family's ``die_in_call``
        fault in the first group on that family.
        """
        self.family = family
        if self.config.cluster.mode == "process":
            self.group = OneProcess(self.config, get_adapter(family), arm_faults=not self.families_used)
        else:
            from trainer.cluster.group import WorkerGroup  # Ray: imported by a Ray run only

            group = WorkerGroup(
                self.config,
                get_adapter(family),
                self.driver_host,
                workers,
                arm_faults=not self.families_used,
                arm_call_faults=family not in self.families_used,
            )
            group.on_spare_ready = self._spare_ready
            self.group = group
        self.group.start()
        check_shared(self.checkpoint_root, [*self.group.members, *self.group.spares])
        self.families_used.append(family)
        record_group(
            self.journal,
            self.sink,
            self.config.name,
            self.config.train.steps,
            family,
            self.step,
            members=self.group.started_on[: self.group.size],
            spares=self.group.started_on[self.group.size :],
        )
        print(f"worker group up: {family} x{self.group.size}")
        if self.group.spares_short is not None:
            self.journal.record("spares_short", family=family, reason=self.group.spares_short)
            print(f"warning: {self.group.spares_short}")
        if form:
            self.group.form(self.collective_timeout())

    def _spare_ready(self, spare: Any, info: dict[str, Any]) -> None:
        """An actor started after the group (a refill) is up: like the group's own at launch, it must see the
        checkpoint directory (see check_shared); journalled."""
        check_shared(self.checkpoint_root, [spare])
        self.journal.record(
            "spare_ready", family=info["family"], step=self.step, pid=info["pid"], host=info["host"]
        )

    def preflight(self) -> State:
        """A hand-over's parity check if one is due, then probe the group's devices and interconnect."""
        failed = self.handover.check_parity()
        if failed is not None:
            return failed
        if not self.config.probes.preflight:
            return State.RUNNING
        finding = self.health.probe(self.members, self.family, self.step, "preflight")
        return State.RUNNING if finding is None else self.on_event(*finding)

    def _run_chunk(self) -> State:
        total = self.config.train.steps
        if self.step >= total:
            return self._finish()
        # Replaced once every rank is idle at self.step. Looked up at most every LeaveWatch.every_s: a look is a
        # call to Ray's key-value store, half of the driver's sampled time per chunk when made at every chunk.
        asked = self.leave_watch.ranks if self.leave_watch(self.members) else []
        if asked:
            detail = "SIGTERM to the worker between chunks: every rank idle at the same step"
            return self._halted(lambda: self.on_event(FailureKind.WORKER_PREEMPTED, tuple(asked), detail))
        ahead = self.next_fixed_point()
        until = min(ahead, self.step + self.chunk_steps())
        started = time.monotonic()
        outcome = self._chunk(
            until,
            stop=lambda: self.preemption.requested or self.leave_watch(self.members),
            ahead=ahead,
            every=self.chunk_steps(),
        )
        self.ahead = None
        if outcome.stop_step is not None and self.preemption.requested:
            return self._preempted(outcome)
        if outcome.stop_step is not None and not outcome.failed():  # a worker asked to leave
            self._on_heartbeat(outcome, outcome.stop_step, started)
            detail = "SIGTERM to the worker inside a chunk: every rank stopped after the step in flight"
            return self.on_event(FailureKind.WORKER_PREEMPTED, tuple(self.leave_watch.ranks), detail, outcome)
        if outcome.failed():
            self.goodput.bad("lost_work", time.monotonic() - started)
            return self._on_failure(outcome)
        self._on_heartbeat(outcome, until, started)
        self.ahead = ahead if ahead > until else None  # the ranks train on towards it meanwhile
        finding = self.health.after_chunk(self.members, self.family, self.step, outcome)
        if finding is not None:
            return self._halted(lambda: self.on_event(*finding))
        grow = False
        if time.monotonic() >= self.next_spare_check:  # a warm spare that died is replaced in the background
            self.next_spare_check = time.monotonic() + _SPARE_CHECK_S
            if self.group is not None and self.group.refill_spares():
                self.journal.record("spare_replaced", family=self.family, step=self.step)
            grow = self.room_to_grow()  # a shrunk group (cluster.min_workers) grows back between two chunks
        if self.ahead is None and self.step < total:  # every member idle: refresh the shard copies if due
            self.shard_copies.after_chunk(self.members, self.step, self.family)
        if checkpoint_due(self.step, self.config.checkpoint.interval_steps, total):  # a fixed point: idle
            self.saves.save(self.saves.writers(self.members), self.step)
        return self._halted(self.grow) if grow else State.RUNNING

    def next_fixed_point(self) -> int:
        """The next step where the driver acts with every rank idle — a checkpoint, an in-flight probe, the
        end of the run — up to which a Ray group's ranks train without waiting for the driver at each
        chunk's end (:mod:`trainer.cluster.stretch`). Each chunk's end is one where shard copies are kept
        (they are taken between chunks) and in a group of one (no round trip to save)."""
        point = self.config.train.steps
        for interval in (self.config.checkpoint.interval_steps, self.config.probes.interval_steps):
            if interval:
                point = min(point, (self.step // interval + 1) * interval)
        if self.config.cluster.mode == "process" or self.shard_copies.between_chunks:
            point = min(point, self.step + self.chunk_steps())
        return point

    def _halt(self) -> ChunkOutcome | None:
        """Ranks training on past the last chunk (towards ``self.ahead``) stop after the step in flight, all
        at one step, and idle; their steps since that chunk are one more heartbeat. None: none trained on."""
        if self.ahead is None:
            return None
        ahead, self.ahead, started = self.ahead, None, time.monotonic()
        outcome = self._chunk(ahead, stop=lambda: True)
        if not outcome.failed():
            self._on_heartbeat(outcome, ahead if outcome.stop_step is None else outcome.stop_step, started)
        return outcome

    def _chunk(self, until: int, **options: Any) -> ChunkOutcome:
        """Every rank trains until ``until``, watched under the run's deadlines (:func:`run_chunk`)."""
        limits = self.deadlines
        hang, chunk, release = limits.hang_after_s(), limits.chunk_s(until - self.step), limits.release_s()
        watched = {"relays": self.relays, "compile_s": limits.compile_s(), **options}
        return run_chunk(self.members, until, hang, chunk, release, **watched)

    def _halted(self, then: Callable[[], State]) -> State:
        """``then()`` with every rank idle at ``self.step`` (:meth:`_halt`); a failure found meanwhile first."""
        halted = self._halt()
        if halted is not None and halted.failed():
            return self._on_failure(halted)
        return then()

    def _on_failure(self, outcome: ChunkOutcome) -> State:
        self.failure_time = time.monotonic()
        outcome.preempted = sorted(
            {*outcome.preempted, *(r for r in leaving(self.members) if r in outcome.lost)}
        )
        kind, ranks, detail = outcome.event()
        if kind is FailureKind.DEADLINE:
            self.journal.record(
                "hang_detected",
                ranks=list(ranks),
                silent_s=outcome.hang_detected_after_s,
                threshold_s=self.deadlines.hang_after_s(),
                step=self.step,
            )
        if outcome.unreleased:
            self.journal.record(
                "ranks_not_released", ranks=outcome.unreleased, release_s=outcome.release_s, step=self.step
            )
        return self.on_event(kind, ranks, detail, outcome)

    def _on_lost(self, exc: Exception) -> State:
        """A worker found gone outside a training chunk: ask the others who is left, then tell the policy."""
        self.failure_time = time.monotonic()
        steps = self.group.live_steps() if self.group is not None else {}
        size = len(self.group.members) if self.group else 0
        outcome = ChunkOutcome.at(steps, lost=[r for r in range(size) if r not in steps])
        lost = outcome.lost
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return self.on_event(FailureKind.WORKER_LOST, tuple(lost), detail, outcome)

    def on_event(
        self, kind: FailureKind, ranks: tuple[int, ...], detail: str, outcome: ChunkOutcome | None = None
    ) -> State:
        """Record an event, ask the policy, and return the state that carries out its decision."""
        event = FailureEvent(kind, ranks, self.step, self.family, time.time(), detail[:1000])
        self.events.append(event)
        decision = decide(self.events, PolicyConfig.of(self.config, self.given_up))
        # A planned removal is journalled as what it is, not as a failure.
        self.journal.record(
            "failure" if kind is not FailureKind.WORKER_PREEMPTED else kind.value, **event.record()
        )
        self.journal.record("decision", **decision.record(self.step))
        print(f"{kind.value} on {self.family} (ranks {list(ranks)}) at step {self.step} -> {decision.reason}")
        if decision.action is Action.ABORT:
            self.abort_reason = decision.reason
            self.journal.record("run_aborted", step=self.step, reason=decision.reason)
            print(f"aborting: {decision.reason}")
            return State.ABORTED
        if decision.action is Action.CONTINUE:
            return State.RUNNING
        if decision.action is Action.FALLBACK:
            self.handover.prepare(decision, outcome)
            return State.HANDING_OVER
        self.pending = (
            decision,
            outcome or ChunkOutcome.at(dict.fromkeys(range(len(self.members)), self.step)),
        )
        return State.RECOVERING

    # --- heartbeats and checkpoints ------------------------------------------------------------------
    def _on_heartbeat(self, outcome: ChunkOutcome, until: int, started: float) -> None:
        beat = Heartbeat.of(outcome.results, until)
        self.deadlines.record(beat.step_times)
        self.goodput.productive(sum(beat.step_times))
        if beat.losses:
            self.last_loss = beat.losses[-1]
        if self.failure_time is not None:
            first_step_done = started + (beat.step_times[0] if beat.step_times else 0.0)
            self.journal.record(
                "first_step_after_recovery",
                step=beat.first_step,
                family=self.family,
                failure_to_step_s=first_step_done - self.failure_time,
            )
            self.failure_time = None
        self.handover.on_first_heartbeat(beat.first_step, started, outcome.results[0], beat.losses)
        self.step = until
        beat.record(self.journal, self.sink, self.config, self.family, self.last_loss)
        totals = self.goodput.snapshot()
        self.sink.goodput(totals["ratio"], totals["badput_s"])
        median = beat.median_step_s
        rate = self.config.train.global_batch_size / median if median else 0.0
        restarts = len(self.recoveries) + len(self.handover.completed)
        family = f"{self.family} x{len(self.members)}"
        for offset, loss in enumerate(beat.losses):
            self.progress.update(beat.first_step + offset, loss, rate, family, restarts)

    def chunk_steps(self) -> int:
        """Steps per chunk: ``cluster.chunk_steps`` for a Ray group (each chunk costs its members a round
        trip), or as many as fill ``cluster.chunk_s`` at the median step time; for a group of one, a log
        line's (``train.log_interval``): its heartbeats fall where it logs."""
        if self.config.cluster.mode == "process":
            return self.config.train.log_interval
        return self.deadlines.chunk_steps()

    def collective_timeout(self) -> float:
        """The collective timeout the next incarnation joins with (from the measured step time); the backend
        timeouts and environment its members derive from it (``join_group``) are journalled when they change."""
        timeout = self.deadlines.collective_timeout()
        derived = get_adapter(self.family).backend_timeouts(timeout).to_dict()
        if derived != self.last_backend_timeouts:
            self.last_backend_timeouts = derived
            self.journal.record("backend_timeouts", family=self.family, step=self.step, **derived)
        return timeout
