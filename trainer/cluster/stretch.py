"""A rank's training from one fixed point of the run to the next, on a thread of its own, so that no rank
waits for the driver between two chunks.

The driver asks for a chunk with ``train(until, ahead, every)``: reply once step ``until`` is done, and
go on training towards ``ahead`` — the next point where the driver needs every rank idle (a checkpoint, a
probe, the end of the run) — while the reply travels and the driver takes it in. Chunk ends fall every
``every`` steps from the first ``until`` and at ``ahead``, as the driver cuts them (``Controller._run_chunk``);
the training thread takes each chunk's end figures as it passes it (the last step's non-finite decision
settled, the task's metrics read), and the driver's next ``train`` call collects them, usually after the
rank is already a few steps into that chunk. Without it each chunk end cost every rank the driver's
round trip: ~6 ms per chunk on the 2-core host, ~4.6 ms on an H200, where the device's queue drained too.

A rank trains only what the driver asked for (``ahead`` at most), so between two fixed points the driver
can still stop every rank at one step (:func:`trainer.cluster.watch.stop_all`): a finding, a worker asked to
leave, a preemption. A stop caps the stretch (``stop_after``); a stretch that fails — a collective error, the
user's code raising — ends on that step, and the next ``train`` call reports it, as a chunk's call did.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trainer.worker import Worker, host_values


class Stretch:
    """The training thread of one rank and the figures it keeps until the driver collects them."""

    def __init__(self, worker: Worker, run: Callable[[Callable[[], None]], str | None]) -> None:
        """``run(body)``: runs the steps, returns a collective error (the rank has then left its group) or
        None, and raises what the user's code raised (``WorkerActor``'s ``run_or_leave``)."""
        self.worker = worker
        self._run = run
        self._cond = threading.Condition()
        #: Whether the thread is training: a release (``WorkerActor.release``) acts only then.
        self.running = False
        #: Train up to this step; stop after ``stop_step`` if one is asked (a stop of every rank).
        self._target = 0
        self.stop_step: int | None = None
        #: Chunk ends: ``first_end``, every ``every`` steps after it, and the target.
        self._first_end, self._every = 0, 0
        self._asked: set[int] = set()
        #: Steps done and not collected yet: (step, loss on the device, step time, compute time).
        self._steps: list[tuple[int, torch.Tensor, float, float]] = []
        #: Chunk ends passed and not collected yet: step → (when, the task's metrics then).
        self._ends: dict[int, tuple[float, dict[str, float]]] = {}
        #: The step and time of the last chunk end collected.
        self._collected, self._collected_at = 0, time.perf_counter()
        self._failure: str | None = None
        self._raised: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def reset(self, wait_s: float = 30.0) -> None:
        """A new group (``join``): nothing of the previous incarnation is owed, no stop is in force. The
        driver joins only ranks that replied (:func:`trainer.cluster.watch.run_chunk` awaits those that had
        gone on training): a stretch still running is one in a collective of the group just left, which
        fails once that group's connections are closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self.running, timeout=wait_s):
                raise RuntimeError(f"this rank was still training {wait_s:.0f} s after it left its group")
            self.stop_step, self._failure, self._raised = None, None, None
            self._steps, self._ends = [], {}

    def close(self) -> None:
        """The training thread ends once idle (a member in the driver's process that is dropped; a Ray
        actor's ends with its process)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stop_after(self, step: int) -> None:
        with self._cond:
            self.stop_step = step

    def train(self, until: int, ahead: int | None = None, every: int = 0) -> dict[str, Any]:
        """Reply with the figures of every step up to ``until`` — or up to where the stretch stopped, failed
        or raised — going on towards ``ahead`` (at most) meanwhile."""
        with self._cond:
            target = max(until, ahead or until)
            if not self.running and self._failure is None and self._raised is None:
                self._start(until, target, every)
            elif self.running:
                self._target = max(self._target, target)
                self._asked.add(until)  # an end, as cut (a stop step is one too)
            self._cond.wait_for(lambda: not self.running or until in self._ends or self.worker.step > until)
            taken = self._take(until)
        return taken if isinstance(taken, dict) else taken.reply(self.worker)

    def _start(self, until: int, target: int, every: int) -> None:
        """A new stretch, from an idle rank (under the lock)."""
        step = self.worker.step
        if self.stop_step is not None and self.stop_step <= step < until:
            self.stop_step = None  # the stop asked was reached: this call starts what follows it
        self._target, self._first_end, self._every, self._asked = target, until, every, set()
        self._collected, self._collected_at = step, time.perf_counter()
        self.worker.mark("idle")  # fresh progress mark: time spent idle before the stretch is not a hang
        if step >= until or (self.stop_step is not None and step >= self.stop_step):
            return  # nothing to train (a late catch-up call): the reply says where the rank is
        self.running = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._train, name="stretch", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _train(self) -> None:
        """The training thread: one for the process's life, since a thread's first step costs more than the
        next ones (per-thread state of torch's CPU kernels: a new thread per chunk made digits' 23 ms steps
        5-13 ms longer on the 2-core host)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.running or self._closed)
                if not self.running:
                    return
            failure: str | None = None
            raised: BaseException | None = None
            try:
                failure = self._run(self._steps_until_done)
            except BaseException as exc:  # the user's code (UserCodeError), or a bug: the next call raises it
                raised = exc
            with self._cond:
                self.running = False
                self._failure, self._raised = failure, raised
                self.worker.mark("idle")
                self._cond.notify_all()

    def _steps_until_done(self) -> None:
        while True:
            with self._cond:
                step = self.worker.step
                if step >= self._target or (self.stop_step is not None and step >= self.stop_step):
                    break
            result = self.worker.train_step()
            with self._cond:
                self._steps.append((self.worker.step, result.loss, result.step_time_s, result.compute_s))
            if self._is_end(self.worker.step):
                self._end(self.worker.step)
        if self.worker.step not in self._ends:  # stopped between two ends: the stop step is one
            self._end(self.worker.step)

    def _is_end(self, step: int) -> bool:
        if step >= self._target or step == self.stop_step or step in self._asked:
            return True
        return step >= self._first_end and self._every > 0 and (step - self._first_end) % self._every == 0

    def _end(self, step: int) -> None:
        """A chunk end passed: the last step's non-finite decision (if the device kept it) and the task's
        metrics, taken on this thread, between two steps."""
        self.worker.nonfinite.settle()
        metrics = self.worker.task_metrics()
        with self._cond:
            self._ends[step] = (time.perf_counter(), metrics)
            self._cond.notify_all()

    def _take(self, until: int) -> dict[str, Any] | _Collected:
        """What the reply for ``until`` is made of, taken out of the stretch (under the lock; the reply is
        made outside it, so that reading the losses from the device never holds the training thread up).
        Raises what the stretch raised."""
        if self._failure is not None or self._raised is not None:
            failure, raised = self._failure, self._raised
            self._failure, self._raised, self._steps, self._ends = None, None, [], {}
            if raised is not None:
                raise raised
            return {"ok": False, "step": self.worker.step, "error": failure}
        end = max((s for s in self._ends if s <= until), default=self.worker.step)
        at, metrics = self._ends.get(end, (time.perf_counter(), None))
        done = [s for s in self._steps if s[0] <= end]
        self._steps = self._steps[len(done) :]
        self._ends = {s: e for s, e in self._ends.items() if s > end}
        taken = _Collected(self._collected, end, at - self._collected_at, done, metrics)
        self._collected, self._collected_at = end, at
        return taken


@dataclass
class _Collected:
    """The steps of one reply: after step ``first`` up to ``end``, and the task's metrics at ``end`` (None:
    nothing was trained since the last reply; read them now)."""

    first: int
    end: int
    elapsed_s: float
    steps: list[tuple[int, torch.Tensor, float, float]]
    metrics: dict[str, float] | None

    def reply(self, worker: Worker) -> dict[str, Any]:
        return {
            "ok": True,
            "step": self.end,
            "losses": host_values([loss for _, loss, _, _ in self.steps]),  # the chunk's one device read
            "step_times": [t for _, _, t, _ in self.steps],
            "compute_times": [c for _, _, _, c in self.steps],
            "elapsed_s": self.elapsed_s,
            "skipped_steps": [s for s in worker.nonfinite.since(self.first) if s <= self.end],
            "task_metrics": worker.task_metrics() if self.metrics is None else self.metrics,
        }
