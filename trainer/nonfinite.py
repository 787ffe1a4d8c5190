"""Steps whose gradients are not finite: skipped on every rank alike, recorded, and a stop after too many.

A NaN or an infinity in one rank's loss or gradients reaches every rank through the gradient all-reduce
(a sum with a NaN is a NaN), so the check runs on the all-reduced (and unscaled) gradients: every rank
comes to the same decision without another collective, as GradScaler decides with its ``found_inf``. The
step then changes nothing — no optimizer step, no LR-scheduler step — but it is counted: its batch is
consumed, so the data position stays a pure function of the step and a resumed run reads what an
uninterrupted one reads. The skipped steps are part of the run's state (checkpoints and peer snapshots),
reported at the end of each chunk, and once ``train.max_nonfinite_steps`` consecutive steps are skipped
the run stops as a user error: the model has diverged, and no other device will do better.

The decision is read on the host once per step, before the optimizer step: it is the step's one wait for
the device (losses stay on the device and are read once per chunk or log line), as GradScaler's read of its
``found_inf`` is under fp16. Skipping the optimizer and scheduler steps exactly, for any optimizer, needs
the decision on the host before them. Under fp16 the GradScaler's own overflow
skips are such steps too: while it lowers its scale, a few consecutive ones are normal.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class NonFiniteSteps:
    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        #: Steps (1-based, as the run counts them) whose update was skipped, oldest first.
        self.skipped: list[int] = []

    def skip(self, step: int, norm: torch.Tensor) -> bool:
        """Whether step ``step`` must be skipped, given its gradients' total norm; raises
        :class:`UserCodeError` when it makes ``max_consecutive`` skipped steps in a row."""
        if bool(torch.isfinite(norm).item()):
            return False
        self.skipped.append(step)
        streak = self.streak(step)
        if streak >= self.max_consecutive:
            raise UserCodeError(
                f"the gradients were not finite (NaN or infinite) on {streak} consecutive steps "
                f"({step - streak + 1}..{step}); each was skipped, and train.max_nonfinite_steps="
                f"{self.max_consecutive} stops the run here: look for a NaN in the loss, a too high "
                "learning rate, or bad samples in those steps' batches"
            )
        return True

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
        """The task's extra state plus this record, for a checkpoint or a snapshot."""
        return {**extra, STATE_KEY: list(self.skipped)}

    def take_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Adopt the record from restored extra state; returns the task's part (checkpoints written before
        the record existed have none: no step was skipped then)."""
        extra = dict(extra)
        self.skipped = [int(s) for s in extra.pop(STATE_KEY, [])]
        return extra


def report_skipped(steps: list[int], family: str, journal: Journal, sink: MetricsSink) -> None:
    """Steps whose update was skipped: journalled, counted, and said on the console."""
    journal.record("nonfinite_skipped", steps=steps, family=family)
    sink.skipped_steps(len(steps))
    print(f"steps {steps} skipped: their gradients were not finite (NaN or infinite)", flush=True)
