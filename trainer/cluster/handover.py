"""Handing a live run over to another device family.

1. take the newest state from the family being given up: a live worker's in-memory snapshot (through
   Ray's object store) and its held-out loss, else the newest committed checkpoint and the held-out loss
   its manifest recorded (``newest_state``). Sharded state (FSDP) is held whole by no member: the old group
   evaluates it and writes it as a checkpoint with that loss before it stops (``_save_sharded``);
2. stop the old group; start a group on the new family (its Ray resource, its backend, its world size:
   ``cluster.family_workers``); load the state (RNG re-derived from (seed, step, rank); a checkpoint's
   shards resharded to the new world size);
3. parity check: the held-out loss on the new family against the old family's at the same step, within a
   tolerance set by the precision; a failure is an event the policy sees;
4. preflight probes on the new family, then training goes on.

Every step is journalled; the hand-over time runs from the decision to the first completed step on the
new family.
"""

from __future__ import annotations

import math
import time
from typing import Any

from trainer.cluster.newest_state import HeldState
from trainer.cluster.run_control import RunControl, State
from trainer.cluster.watch import ChunkOutcome
from trainer.errors import DeviceUnavailableError
from trainer.policy import Decision, FailureKind


class HandOver:
    def __init__(self, ctl: RunControl) -> None:
        self.ctl = ctl
        self.decision: Decision | None = None
        self.outcome: ChunkOutcome | None = None
        self.decided_at = 0.0
        #: (old family, new family, reference loss, state origin) while a parity check is due.
        self.parity: tuple[str, str, float, str] | None = None
        self.awaiting: dict[str, Any] | None = None
        self.completed: list[dict[str, Any]] = []

    def prepare(self, decision: Decision, outcome: ChunkOutcome | None) -> None:
        self.decision, self.outcome, self.decided_at = decision, outcome, time.monotonic()

    def run(self) -> State:
        ctl, decision = self.ctl, self.decision
        assert decision is not None and decision.family is not None
        old, target = ctl.family, decision.family
        ctl.given_up.add(old)
        ctl.journal.record(
            "handover_started", from_family=old, to_family=target, step=ctl.step, reason=decision.reason
        )
        print(f"handing over from {old} to {target} at step {ctl.step}")
        evaluated = self._save_sharded() if ctl.config.train.sharded else None
        held = self._newest_state()
        if ctl.group is not None:
            ctl.saves.settle()  # a sharded save the members are writing commits before they are stopped
            ctl.group.shutdown()
            ctl.group = None
        try:
            ctl.launch(target, form=False)  # joined after the state is loaded, so DDP broadcasts it
        except DeviceUnavailableError as exc:
            return ctl.on_event(FailureKind.FAMILY_UNAVAILABLE, (), str(exc))
        previous = ctl.step
        # Due before the state is loaded: a worker lost while loading it is repaired, then the check runs.
        if held is not None:
            self._due(old, target, held.reference_loss, f"{held.origin} on {old}", previous, held.step)
        loaded = ctl.load_newest()
        if held is None:
            restored = loaded.restored
            reference = float(restored["metrics"].get("eval_loss", math.nan)) if restored else math.nan
            if evaluated is not None and evaluated[0] == loaded.step:
                reference = evaluated[1]  # the old group's held-out loss of the state loaded
            origin = "newest committed checkpoint" if restored else loaded.origin
            self._due(old, target, reference, origin, previous, loaded.step)
        assert ctl.group is not None
        ctl.group.form(ctl.collective_timeout())
        return ctl.preflight()  # the parity check first

    def _due(self, old: str, target: str, reference: float, origin: str, previous: int, step: int) -> None:
        """The parity check, and the hand-over's completion at the first step, are now due."""
        self.parity = (old, target, reference, origin)
        self.awaiting = {
            "from_family": old,
            "to_family": target,
            "state_from": origin,
            "state_step": step,
            # Steps completed on the old family after its last heartbeat, kept through the snapshot.
            "kept_steps": [previous + 1, step] if step > previous else None,
        }

    def _save_sharded(self) -> tuple[int, float] | None:
        """FSDP: the old group's state at its step, with its held-out loss (every member evaluates), written as
        a checkpoint and committed before the group stops — the state the new group loads, at any world size.
        Returns (step, held-out loss): the parity check's reference if that state is the one loaded. Only
        between chunks, with every member at the run's step; otherwise (None) the newest committed checkpoint
        is handed over."""
        ctl = self.ctl
        if not (ctl.group and ctl.group.members) or self.outcome is not None:
            # No live group (its family could not start one), or a chunk that failed: its members may have
            # left their group and hold the states of later steps than the run's (its last heartbeat).
            return None
        step = ctl.step
        steps = ctl.group.live_steps()
        if len(steps) != ctl.group.size or set(steps.values()) != {step}:
            return None  # a member lost, or at another step: no whole state of the run's step
        try:
            loss = ctl.evaluate()
            if ctl.saves.last_saved != step:  # a checkpoint of this step is never written twice
                ctl.saves.save(ctl.saves.writers(ctl.group.members), step, {"eval_loss": loss})
            ctl.saves.settle()
        except Exception as exc:  # a member lost meanwhile: the newest committed checkpoint is handed over
            ctl.journal.record("handover_save_failed", step=step, reason=f"{type(exc).__name__}: {exc}")
            return None
        return step, loss

    def _newest_state(self) -> HeldState | None:
        """A live member's snapshot and its held-out loss on the old family; None: no member has one."""
        ctl = self.ctl
        if ctl.held is None and ctl.group is not None and ctl.group.members:
            if self.outcome is None:
                steps = ctl.group.live_steps()
            else:
                gone = set(self.outcome.lost) | set(self.outcome.hung)
                steps = {r: res.get("step") for r, res in self.outcome.results.items() if r not in gone}
            ctl.held = ctl.hold_newest(steps, evaluate=True)
        return ctl.held

    def check_parity(self) -> State | None:
        """Run the parity check if one is due: the held-out loss on the new family against the old family's
        at the same step, within a tolerance set by the precision. A failed check is an event for the policy
        (its state is returned); None otherwise."""
        if self.parity is None:
            return None
        ctl = self.ctl
        observed = ctl.evaluate()
        (old, target, reference, origin), self.parity = self.parity, None
        rtol = ctl.config.fault_tolerance.parity_rtol.get(ctl.config.device.precision, 1e-4)
        checked = not math.isnan(reference)
        passed = checked and abs(observed - reference) <= rtol * abs(reference)
        ctl.journal.record(
            "parity_check",
            step=ctl.step,
            from_family=old,
            to_family=target,
            state_from=origin,
            reference_loss=reference,
            observed_loss=observed,
            rtol=rtol,
            checked=checked,
            passed=passed,
        )
        print(
            f"parity check at step {ctl.step}: held-out loss {reference:.6f} on {old}, {observed:.6f} on "
            f"{target} (rtol {rtol:g}) -> {'passed' if passed else 'FAILED' if checked else 'no reference'}"
        )
        if checked and not passed:
            return ctl.on_event(FailureKind.PARITY_FAILED, (), f"held-out loss {observed} vs {reference}")
        return None

    def on_first_heartbeat(
        self, first_step: int, chunk_started: float, reply: dict[str, Any], losses: list[float]
    ) -> None:
        """Close the hand-over's books at the first completed step on the new family."""
        if self.awaiting is None:
            return
        done_at = chunk_started + (reply["step_times"][0] if reply["step_times"] else 0.0)
        entry = {
            **self.awaiting,
            "step": first_step,
            "handover_s": done_at - self.decided_at,
            "first_loss": losses[0] if losses else None,
        }
        self.completed.append(entry)
        self.ctl.sink.handover(entry["from_family"], entry["to_family"], entry["handover_s"])
        self.ctl.journal.record("handover_completed", **entry)
        print(
            f"hand-over done: first step {first_step} on {entry['to_family']} "
            f"{entry['handover_s']:.1f} s after the decision"
        )
        self.awaiting = None
