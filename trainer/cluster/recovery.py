"""How a group run recovers once the policy decided to: replace the lost ranks in place from warm spares
with the newest live state (repeated when members are lost during the repair), or rebuild the group.

A part of :class:`~trainer.cluster.controller.Controller` kept in a file of its own; the attributes below are
the controller's.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from trainer.cluster import calls
from trainer.cluster.endings import RunEndings
from trainer.cluster.handover import HandOver
from trainer.cluster.leaving import forget
from trainer.cluster.newest_state import HeldState, Loaded, hold_newest, load
from trainer.cluster.run_control import State
from trainer.cluster.shard_copies import ShardCopies
from trainer.cluster.watch import ChunkOutcome
from trainer.config import Config
from trainer.devices import get_adapter
from trainer.errors import DeviceUnavailableError
from trainer.metrics import MetricsSink
from trainer.policy import Decision, FailureKind

#: Repairs in place tried for one failure when members keep being lost meanwhile; then the group is rebuilt.
_REPAIR_ROUNDS = 3


class RunRecovery(RunEndings):
    config: Config
    sink: MetricsSink
    handover: HandOver
    held: HeldState | None
    #: Sharded state: every rank's copy of its own shards, the way back for a lost rank (shard_copies).
    shard_copies: ShardCopies
    pending: tuple[Decision, ChunkOutcome] | None
    checkpoint_root: str

    # The controller's own (trainer.cluster.controller.Controller), named here for the type checker.
    def launch(self, family: str, workers: int | None = None, form: bool = True) -> None:
        raise NotImplementedError

    def on_event(
        self, kind: FailureKind, ranks: tuple[int, ...], detail: str, outcome: ChunkOutcome | None = None
    ) -> State:
        raise NotImplementedError

    def collective_timeout(self) -> float:
        raise NotImplementedError

    def _recover(self) -> State:
        assert self.pending is not None
        decision, outcome = self.pending
        self.pending = None
        if self.group is None:
            return self._rebuild("no worker group is left to repair")
        started, replaced = time.monotonic(), set(decision.ranks)
        for _ in range(_REPAIR_ROUNDS):
            try:
                return self._repair(decision, outcome, started, replaced)
            except calls.call_errors(DeviceUnavailableError) as exc:
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if isinstance(exc, DeviceUnavailableError):  # no spare can be had: a new group, or the policy
                    return self._rebuild(f"repair in place failed: {why}")
                # A member (often the spare just placed) was lost during the repair: replace it the same way.
                steps = self.group.live_steps()
                lost = [r for r in range(len(self.members)) if r not in steps]
                if not lost:
                    return self._rebuild(f"repair in place failed: {why}")
                self.journal.record("lost_during_repair", ranks=lost, step=self.step, error=why)
                self.progress.message(f"ranks {lost} lost during the repair ({why}): replacing them too")
                outcome = ChunkOutcome.at(steps, lost=lost)
                decision = Decision(decision.action, decision.reason, tuple(lost))
                replaced |= set(lost)
        return self._rebuild(f"members kept being lost during {_REPAIR_ROUNDS} repairs in place")

    def _rebuild(self, why: str) -> State:
        """A new group on the same family with the newest state (a live member's, else the newest checkpoint's);
        if the family can no longer start one (its nodes are gone), that is an event for the policy, and the
        state held from a live member goes on to the hand-over."""
        started, previous = time.monotonic(), self.step
        size = self.group.size if self.group is not None else self.config.cluster.workers_on(self.family)
        self.journal.record("group_rebuild", family=self.family, step=self.step, reason=why)
        self.progress.message(f"rebuilding the {self.family} group: {why}")
        if self.group is not None and self.held is None:
            self.held = self.hold_newest(self.group.live_steps(), evaluate=True)
        loaded = self._relaunch()
        if isinstance(loaded, State):
            return loaded
        self._recovered("rebuild", [], loaded, previous, started)
        self._record_size(f"rebuilt after: {why}", size)
        return self.handover.check_parity() or State.RUNNING

    def _relaunch(self) -> Loaded | State:
        """Stop the group, start the family again at :meth:`launchable_size`, give it the newest state and form
        it; what it loaded, or (the family cannot start one) the state the policy's decision leads to."""
        if self.group is not None:
            self.saves.settle()  # a sharded save the members are writing commits before they are stopped
            self.group.shutdown()
            self.group = None
        try:
            self.launch(self.family, workers=self.launchable_size(), form=False)
        except DeviceUnavailableError as exc:
            if self.held is not None and self.held.refs:
                self.held = None  # shard copies are no state to hand over (a hand-over reads a checkpoint)
            return self.on_event(FailureKind.FAMILY_UNAVAILABLE, (), str(exc))
        loaded = self.load_newest()
        assert self.group is not None
        self.group.form(self.collective_timeout())
        return loaded

    def launchable_size(self) -> int:
        """The world size to start the family with: its own (``cluster.workers``, or ``family_workers``) if its
        capacity holds them, else (with ``cluster.min_workers`` below it) as many as it holds, not fewer than
        ``min_workers`` (a launch that cannot get them fails, and the family is unavailable to the policy)."""
        wanted = self.config.cluster.workers_on(self.family)
        least = self.config.cluster.least_workers_on(self.family)
        if least >= wanted:
            return wanted
        from trainer.cluster.group import capacity  # a group of one has no floor below its size

        fits = capacity(get_adapter(self.family), self.config.cluster.cpus_per_worker)
        return max(least, min(wanted, fits))

    def grow(self) -> State:
        """Capacity for the missing workers is back: the group is rebuilt at ``cluster.workers`` with a live
        member's state (where the launch gets fewer, at what the family holds)."""
        assert self.group is not None
        started, previous = time.monotonic(), self.group.size
        if self.config.train.sharded and self.saves.last_saved != self.step:  # handed on through a checkpoint
            self.saves.save(self.saves.writers(self.members), self.step)
        self.saves.flush(self.members[0], self.step)  # a checkpoint being written commits first
        self.held = self.hold_newest(self.group.live_steps())
        loaded = self._relaunch()  # the family taken by another job meanwhile: the policy decides
        if isinstance(loaded, State):
            return loaded
        self._record_size("capacity for the missing workers is back", previous, time.monotonic() - started)
        return State.RUNNING

    def room_to_grow(self) -> bool:
        """Whether the group is below its family's world size and the cluster has room for the missing ones."""
        if self.group is None or self.group.size >= self.config.cluster.workers_on(self.family):
            return False
        missing = self.config.cluster.workers_on(self.family) - self.group.size
        from trainer.cluster.group import free_bundles  # a group of one is never short of workers

        return free_bundles(self.group.adapter, self.config.cluster.cpus_per_worker) >= missing

    def _record_size(self, why: str, before: int, resize_s: float | None = None) -> None:
        """Journal a change of the group's world size (from ``before``); the metrics follow from launch()."""
        assert self.group is not None
        if self.group.size == before:
            return
        self.journal.record(
            "group_resized",
            family=self.family,
            step=self.step,
            from_workers=before,
            to_workers=self.group.size,
            reason=why,
            resize_s=resize_s,
        )
        self.progress.message(
            f"the {self.family} group goes on with {self.group.size} workers (was {before}): {why}"
        )

    def _repair(self, decision: Decision, outcome: ChunkOutcome, started: float, replaced: set[int]) -> State:
        """Replace the lost ranks from warm spares and re-form the group with the newest live state.
        ``started`` and ``replaced``: when the recovery began and every rank it replaced (earlier rounds too)."""
        assert self.group is not None
        previous = self.step
        gone = set(outcome.gone()) | set(decision.ranks)
        alive = {rank: r.get("step") for rank, r in outcome.results.items() if rank not in gone}
        self.group.leave_all([self.members[r] for r in alive])
        if self.held is None and self.config.train.sharded:  # no member holds it whole: the shard copies
            self.held = self.shard_copies.held(len(self.members), self.family, self.saves.last_saved)
        if self.held is None:
            self.held = self.hold_newest(alive)  # before replace(): a rebuild would need it too
            if self.held is None and alive:  # each died handing its state over?
                gone |= set(alive) - set(self.group.live_steps())
        forget([self.members[r] for r in gone])
        self.group.replace(tuple(sorted(gone)))
        # Survivors at the held step keep their state (and process, model, RNG): only the others load it.
        newest = self.held.step if self.held is not None else None
        loaded = self.load_newest(
            holding=[r for r, step in alive.items() if r not in gone and step == newest]
        )
        self.group.form(self.collective_timeout())
        self._recovered(decision.action.value, sorted(gone | replaced), loaded, previous, started)
        return self.handover.check_parity() or State.RUNNING

    def hold_newest(self, steps: dict[int, int | None], evaluate: bool = False) -> HeldState | None:
        """A live member's snapshot (see :func:`~trainer.cluster.newest_state.hold_newest`); None with sharded
        state (FSDP): no member holds it whole, and a group that lost a rank cannot gather it any more."""
        if self.config.train.sharded:
            return None
        return hold_newest(self.members, steps, evaluate)

    def evaluate(self) -> float:
        return self.saves.evaluate(self.saves.writers(self.members))

    def load_newest(self, holding: list[int] | None = None) -> Loaded:
        """Give the group the held live state (else the newest checkpoint, else none); the step follows it.
        ``holding``: ranks that already hold the held state and keep it (see :func:`load`)."""
        keep = self.config.checkpoint.keep_last
        self.saves.settle()  # a sharded save every rank wrote commits first, and is the one restored
        loaded = load(self.members, self.held, str(self.checkpoint_root), keep, holding or ())
        held, self.held = self.held, None
        if held is not None and held.refs and loaded.origin != held.origin:
            self.shard_copies.drop(loaded.reason)  # unusable (another world size, a copy lost)
        elif held is None and self.config.train.sharded and loaded.origin == "disk checkpoint":
            loaded = replace(loaded, reason=f"{loaded.reason}; {self.shard_copies.why_not}")
        self.step = loaded.step
        return loaded

    def _recovered(
        self, action: str, replaced: list[int], loaded: Loaded, previous: int, started: float
    ) -> None:
        assert self.group is not None
        entry: dict[str, Any] = {
            "step": self.step,
            # Steps completed by the survivors after the last heartbeat, kept through the snapshot.
            "kept_steps": [previous + 1, self.step] if self.step > previous else None,
            "action": action,
            "replaced_ranks": replaced,
            "state_from": loaded.origin,
            "state_reason": loaded.reason,
            # The ranks the state was loaded into: the others (survivors at that step) kept their own.
            "loaded_ranks": loaded.into if loaded.into is not None else list(range(self.group.size)),
            "recover_s": time.monotonic() - started,
            "incarnation": self.group.incarnation,
        }
        self.recoveries.append(entry)
        self.sink.recovery(action, entry["recover_s"])
        self.journal.record("recovered", family=self.family, **entry)
        print(f"recovered at step {self.step} from {loaded.origin}; replaced ranks {replaced}")

    # --- events --------------------------------------------------------------------------------------
