"""Preemption of the driver: SIGTERM (a Kubernetes eviction, a spot reclaim, SLURM's notice) or SIGINT
(Ctrl-C) asks the run to stop, and it stops having saved the newest state.

The first signal only sets a flag (a signal handler must not do the work): the run loop sees it within a
fraction of a second, stops every rank at the same step — the step in flight — commits a checkpoint of it
within ``checkpoint.preempt_grace_s``, journals ``preempted``, shuts the workers down and exits with
:attr:`ExitCode.PREEMPTED`. Re-running the same command resumes from that checkpoint.

A second signal means "now": :class:`SystemExit` with 128 + the signal's number is raised on the main
thread, which unwinds through the run's clean-ups (workers and the local Ray are stopped) without saving.
Checkpoints are committed atomically, so the previous one stays intact whatever was in flight.

Handlers are installed on the main thread, after ``ray.init`` (which installs its own SIGTERM handler on the
driver), and the previous ones are put back when the run ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from trainer.errors import ExitCode
from trainer.journal import Journal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        #: The signal that asked the run to stop, and when (monotonic); None while none came.
        self.signum: int | None = None
        self.requested_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def left_s(self) -> float:
        """Seconds of the grace period left (the full period before any signal)."""
        if self.requested_at is None:
            return self.grace_s
        return max(0.0, self.requested_at + self.grace_s - time.monotonic())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested_at is not None:
            raise SystemExit(128 + signum)  # the second signal: stop now, no save
        self.signum, self.requested_at = signum, time.monotonic()
        print(
            f"\n{signal.Signals(signum).name}: stopping at the step in flight and saving it "
            f"(within {self.grace_s:g} s; a second signal stops at once without saving)",
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[Preemption]:
        """Handle SIGTERM and SIGINT while the block runs (only on the main thread: elsewhere Python cannot
        install handlers, and the block runs unguarded)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def record_preempted(
    journal: Journal, preemption: Preemption, step: int, saved: int | None, why: str
) -> None:
    """Journal and say that the run stopped on a signal at ``step``, and what it saved (None: nothing)."""
    journal.record(
        "preempted",
        signal=preemption.signal_name,
        step=step,
        saved_step=saved,
        reason=why,
        grace_s=preemption.grace_s,
        grace_left_s=preemption.left_s(),
    )
    kept = (
        f"saved step {saved}" if saved is not None else f"nothing saved ({why}); the newest checkpoint stays"
    )
    print(
        f"preempted by {preemption.signal_name} at step {step}: {kept} (exit code {int(ExitCode.PREEMPTED)})"
    )
