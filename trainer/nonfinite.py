"""Steps whose gradients are not finite: skipped on every rank alike, recorded, and a stop after too many.

A NaN or an infinity in one rank's loss or gradients reaches every rank through the gradient all-reduce
(a sum with a NaN is a NaN), so the check runs on the all-reduced (and unscaled) gradients: every rank
comes to the same decision without another collective, as GradScaler decides with its ``found_inf``. The
step then changes nothing — no optimizer step, no LR-scheduler step — but it is counted: its batch is
consumed, so the data position stays a pure function of the step and a resumed run reads what an
uninterrupted one reads. The skipped steps are part of the run's state (checkpoints and peer snapshots),
reported at the end of each chunk, and once ``train.max_nonfinite_steps`` consecutive steps are skipped
the run stops as a user error: the model has diverged, and no other device will do better.

Where the optimizer can skip its own update on a flag that stays on the device (torch's Adam, AdamW and
SGD built with ``fused=True``, for instance: they take GradScaler's ``found_inf``), the step waits for nothing:
the optimizer is handed the flag, and the host learns the decision one step later — the flag is copied to
host memory behind the step's work and read at the next optimizer step (or at the end of the chunk, or before
a save), when the device is long past it. Only the LR scheduler's step, a host-side change, waits for it;
it is taken then, so a skipped step moves the schedule no more than on the other path. With any other
optimizer (or under fp16, where the GradScaler has its own skip) the decision is read on the host before
the optimizer step: the step's one wait for the device (losses stay on the device and are read once per
chunk or log line). Under fp16 the GradScaler's own overflow skips are such steps too: while it lowers its
scale, a few consecutive ones are normal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from trainer.errors import UserCodeError
from trainer.journal import Journal
from trainer.metrics import MetricsSink

#: Where the skipped steps travel inside the task's extra state (JSON); a task may not use this key.
STATE_KEY = "trainer/skipped_steps"


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The total 2-norm of the gradients, on their device (no host read): finite iff every gradient is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` can skip its update on a flag left on the device (``found_inf``), undoing
    its step counters too, as torch's fused optimizers do for GradScaler."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if isinstance(optimizer, torch.optim.SGD):
        # A fused SGD with momentum that skips its first step keeps the uninitialised buffers it made for it:
        # until every buffer exists, the host decides.
        params = [p for group in optimizer.param_groups if group["momentum"] != 0 for p in group["params"]]
        return all("momentum_buffer" in optimizer.state.get(p, {}) for p in params)
    return True


@dataclass
class _Undecided:
    """A step whose update the device skipped or made, not yet known on the host."""

    step: int
    #: 1.0 where the gradients were not finite; a host copy, filled behind the step's work on an accelerator.
    flag: torch.Tensor
    #: Recorded after the copy (None on the CPU, where the copy is done when it returns).
    copied: Any
    #: What follows a step that was made (the LR scheduler's step).
    then: Callable[[], None]


class NonFiniteSteps:
    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        #: Steps (1-based, as the run counts them) whose update was skipped, oldest first.
        self.skipped: list[int] = []
        self._undecided: _Undecided | None = None
        self._host_flag: torch.Tensor | None = None

    def skip(self, step: int, norm: torch.Tensor) -> bool:
        """Whether step ``step`` must be skipped, given its gradients' total norm (read on the host now);
        raises :class:`UserCodeError` when it makes ``max_consecutive`` skipped steps in a row."""
        self.settle()
        if bool(torch.isfinite(norm).item()):
            return False
        self._record(step)
        return True

    def defer(self, step: int, norm: torch.Tensor, then: Callable[[], None]) -> torch.Tensor:
        """The flag an optimizer that :func:`skips_on_device` takes as its ``found_inf`` for step ``step``:
        1.0 where ``norm`` is not finite, on the device. The host reads it later (:meth:`settle`), and then
        records the skip or calls ``then``."""
        self.settle()
        found = torch.logical_not(torch.isfinite(norm)).to(torch.float32)
        if found.device.type == "cpu":
            self._undecided = _Undecided(step, found, None, then)
            return found
        if self._host_flag is None:
            self._host_flag = torch.empty((), dtype=torch.float32, pin_memory=True)
        self._host_flag.copy_(found, non_blocking=True)
        copied = torch.Event(device=found.device)
        copied.record()
        self._undecided = _Undecided(step, self._host_flag, copied, then)
        return found

    def settle(self) -> None:
        """Take the decision left on the device, if any: record the skip, or make what follows the step.
        Waits only for the point where its flag was copied; raises as :meth:`skip` does."""
        undecided, self._undecided = self._undecided, None
        if undecided is None:
            return
        if undecided.copied is not None:
            undecided.copied.synchronize()
        if undecided.flag.item() == 0.0:
            undecided.then()
        else:
            self._record(undecided.step)

    def _record(self, step: int) -> None:
        self.skipped.append(step)
        streak = self.streak(step)
        if streak >= self.max_consecutive:
            raise UserCodeError(
                f"the gradients were not finite (NaN or infinite) on {streak} consecutive steps "
                f"({step - streak + 1}..{step}); each was skipped, and train.max_nonfinite_steps="
                f"{self.max_consecutive} stops the run here: look for a NaN in the loss, a too high "
                "learning rate, or bad samples in those steps' batches"
            )

    def streak(self, step: int) -> int:
        """How many steps up to ``step`` were skipped in a row."""
        count = 0
        for skipped in reversed(self.skipped):
            if skipped != step - count:
                break
            count += 1
        return count

    def since(self, step: int) -> list[int]:
        """The skipped steps after ``step``."""
        return [s for s in self.skipped if s > step]

    # --- state ---------------------------------------------------------------------------------------
    def with_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The task's extra state plus this record, for a checkpoint or a snapshot; the caller
        settles first (see ``WorkerState.capture``)."""
        return {**extra, STATE_KEY: list(self.skipped)}

    def take_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Adopt the record from restored extra state; returns the task's part (checkpoints written before
        the record existed have none: no step was skipped then)."""
        extra = dict(extra)
        self._undecided = None  # the state it was about is replaced
        self.skipped = [int(s) for s in extra.pop(STATE_KEY, [])]
        return extra


def report_skipped(steps: list[int], family: str, journal: Journal, sink: MetricsSink) -> None:
    """Steps whose update was skipped: journalled, counted, and said on the console."""
    journal.record("nonfinite_skipped", steps=steps, family=family)
    sink.skipped_steps(len(steps))
    print(f"steps {steps} skipped: their gradients were not finite (NaN or infinite)", flush=True)
