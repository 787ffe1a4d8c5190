"""The single-process path (``cluster.mode=process``): one worker in the driver, no Ray.

Trains to ``train.steps``, checkpoints every ``checkpoint.interval_steps`` (asynchronously) and at the end,
and resumes from the newest good checkpoint when the run directory already has one. What it decides and
records over the run's life — cadence, restore report, saves, the end — is the Ray group's too
(:mod:`trainer.lifecycle`); only how the one member is reached (a direct call) is this module's own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.lease import Lease
from trainer.config import Config
from trainer.errors import CheckpointWriteError, ExitCode, UserCodeError
from trainer.goodput import Goodput
from trainer.heartbeat import Heartbeat
from trainer.journal import Journal
from trainer.lifecycle import (
    RestoreReport,
    checkpoint_due,
    record_committed,
    record_failed,
    record_finished,
    record_goodput,
    record_group,
    record_lease_lost,
    record_save_failed,
    record_staged,
    record_started,
    record_user_error,
    report_restore,
)
from trainer.metrics import MetricsSink
from trainer.preemption import Preemption, record_preempted
from trainer.progress import Progress
from trainer.worker import StepResult, Worker, host_values


def run_in_process(
    config: Config,
    home: Path,
    journal: Journal,
    manager: CheckpointManager,
    sink: MetricsSink,
    preemption: Preemption | None = None,
    lease: Lease | None = None,
) -> ExitCode:
    preemption = preemption or Preemption(config.checkpoint.preempt_grace_s)
    goodput = Goodput()
    goodput.resume_from(journal.read())  # a re-launched driver continues the previous account
    worker = Worker(config)
    worker.setup()
    family = worker.adapter.name
    where = f"{family} ({worker.device})"
    record_started(journal, home, family, 1, config.name, "process", where, manager.root)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    record_group(journal, sink, config.name, config.train.steps, family, worker.step, [me], [])
    restored = worker.restore(manager) if config.checkpoint.resume == "latest" else None
    if restored is not None:
        report_restore(journal, RestoreReport.of(restored.reply()), family)
    goodput.bad("startup", time.time() - goodput.session_start)

    steps, interval = config.train.steps, config.checkpoint.interval_steps
    last_saved = worker.step if restored is not None else -1
    checkpointer = AsyncCheckpointer(manager)
    progress = Progress(steps, config.train.log_interval)
    pending = _Pending(worker, progress, goodput)
    save = _Saver(worker, checkpointer, journal, sink, goodput)
    try:
        while worker.step < steps:
            result = worker.train_step()
            pending.results.append(result)
            goodput.productive(result.step_time_s)
            lease_lost = lease is not None and lease.lost.is_set()
            logged = result.step % config.train.log_interval == 0 or result.step == steps
            if logged or preemption.requested or lease_lost:
                pending.report(journal, sink)
            if checkpoint_due(result.step, interval, steps):
                save.background()
                last_saved = result.step
            if lease_lost:
                record_lease_lost(journal, worker.step)
                return ExitCode.ABORTED
            if preemption.requested and worker.step < steps:
                progress.close()
                failed = save.now() if last_saved != worker.step else save.settle()
                why = "" if failed is None else f"the save did not complete: {failed}"
                record_preempted(journal, preemption, worker.step, None if failed else worker.step, why)
                return ExitCode.PREEMPTED
        progress.close()
        eval_loss = worker.evaluate()
        if last_saved != worker.step:
            failed = save.now({"eval_loss": eval_loss})
            if failed is not None:
                return record_failed(journal, worker.step, failed)
    except UserCodeError as exc:  # not retried: it would raise again; the newest checkpoint stays
        return record_user_error(journal, worker.step, family, str(exc), settle=save.settle)
    finally:
        with contextlib.suppress(CheckpointWriteError):  # journalled by its callback
            checkpointer.close()
    totals = record_goodput(journal, sink, goodput)
    return record_finished(journal, sink, worker.step, worker.last_loss, eval_loss, [family], 0, totals)


@dataclass
class _Pending:
    """Steps done whose losses are still on the device: reported together at each log line as one heartbeat
    (journal, metrics, skipped steps, the task's figures), as a worker group reports a chunk, with one read
    of the losses — the training loop never waits for the device to report a step."""

    worker: Worker
    progress: Progress
    goodput: Goodput
    results: list[StepResult] = field(default_factory=list)

    def report(self, journal: Journal, sink: MetricsSink) -> None:
        if not self.results:
            return
        worker, first = self.worker, self.results[0].step
        worker.nonfinite.settle()  # a skip the device decided is reported with its step
        losses = host_values([r.loss for r in self.results])
        times = [r.step_time_s for r in self.results]
        beat = Heartbeat(
            first_step=first,
            step=self.results[-1].step,
            losses=losses,
            step_times=times,
            rank_step_s={0: statistics.median(times)},
            skipped_steps=worker.nonfinite.since(first - 1),
            task_metrics=worker.task_metrics(),
        )
        tokens = int(getattr(worker.data.dataset, "seq_len", 0))
        beat.record(journal, sink, worker.config, worker.adapter.name, losses[-1], tokens_per_sample=tokens)
        totals = self.goodput.snapshot()
        sink.goodput(totals["ratio"], totals["badput_s"])
        samples = worker.config.train.global_batch_size
        for result, loss in zip(self.results, losses, strict=True):
            rate = samples / max(result.step_time_s, 1e-9)
            self.progress.update(result.step, loss, rate, worker.adapter.name, 0)
        self.results.clear()


@dataclass
class _Saver:
    """The one member's saves, made by direct calls; recorded as a group's are (:mod:`trainer.lifecycle`)."""

    worker: Worker
    checkpointer: AsyncCheckpointer
    journal: Journal
    sink: MetricsSink
    goodput: Goodput

    def background(self, metrics: dict[str, float] | None = None) -> None:
        """Stage a checkpoint of the step just done (blocking only for the copy); it commits in the
        background, and its commit (or failure) is journalled when it lands."""
        step, started = self.worker.step, time.monotonic()
        future = self.worker.save_async(self.checkpointer, metrics)
        blocking = self.checkpointer.last_blocking_s
        record_staged(
            self.journal, self.sink, self.goodput, step, blocking, blocking, self.checkpointer.staged_bytes
        )

        def landed(f: Future[Path | str]) -> None:
            error = f.exception()
            if error is None:
                nbytes = self.checkpointer.manager.last_commit_bytes
                record_committed(
                    self.journal, self.sink, str(f.result()), step, nbytes, time.monotonic() - started
                )
            else:  # training goes on; the previous checkpoint is intact
                record_save_failed(self.journal, step, str(error))

        future.add_done_callback(landed)

    def now(self, metrics: dict[str, float] | None = None) -> str | None:
        """Save the step just done and commit it before returning (a save in flight lands first); returns
        None, or why it was not committed."""
        self.settle()  # the previous save lands first
        step, started = self.worker.step, time.monotonic()
        try:
            path = self.worker.save(self.checkpointer.manager, metrics)
        except CheckpointWriteError as exc:
            record_save_failed(self.journal, step, str(exc))
            return str(exc)
        held, nbytes = time.monotonic() - started, self.checkpointer.manager.last_commit_bytes
        record_staged(self.journal, self.sink, self.goodput, step, held, held, nbytes)
        record_committed(self.journal, self.sink, str(path), step, nbytes, held)
        return None

    def settle(self) -> str | None:
        """Let the background save in flight commit; returns None, or why it failed (journalled by its
        callback)."""
        try:
            self.checkpointer.wait()
        except CheckpointWriteError as exc:
            return str(exc)
        return None
