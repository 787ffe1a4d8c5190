"""The single-process path (``cluster.mode=process``): one worker in the driver, no Ray.

Trains to ``train.steps``, checkpoints every ``checkpoint.interval_steps`` (asynchronously) and at the end,
and resumes from the newest good checkpoint when the run directory already has one.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from trainer.checkpoint import CheckpointManager, Restored
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.lease import Lease
from trainer.cluster.heartbeat import Heartbeat
from trainer.config import Config
from trainer.errors import CheckpointWriteError, ExitCode, UserCodeError
from trainer.goodput import Goodput
from trainer.journal import Journal
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
    goodput.resume_from(journal.read())
    worker = Worker(config)
    worker.setup()
    journal.record(
        "run_started", run_dir=str(home), family=worker.adapter.name, world_size=1, name=config.name
    )
    print(f"run directory: {home}")
    print(f"device family: {worker.adapter.name} ({worker.device}), checkpoints: {manager.root}")
    sink.run_info(config.name, worker.adapter.name, 1, config.train.steps)
    restored = worker.restore(manager) if config.checkpoint.resume == "latest" else None
    if restored is not None:
        _report_restore(restored, worker, journal)
    goodput.bad("startup", time.time() - goodput.session_start)

    steps, interval = config.train.steps, config.checkpoint.interval_steps
    last_saved = worker.step if restored is not None else -1
    checkpointer = AsyncCheckpointer(manager)
    progress = Progress(steps, config.train.log_interval)
    pending = _Pending(worker, progress)
    try:
        while worker.step < steps:
            result = worker.train_step()
            pending.results.append(result)
            goodput.productive(result.step_time_s)
            lease_lost = lease is not None and lease.lost.is_set()
            logged = result.step % config.train.log_interval == 0 or result.step == steps
            if logged or preemption.requested or lease_lost:
                pending.report(journal, sink)
            if interval and result.step % interval == 0 and result.step < steps:
                _checkpoint(worker, checkpointer, journal, sink, goodput, config.checkpoint.async_save)
                last_saved = result.step
            if lease_lost:
                journal.record(
                    "lease_lost", step=worker.step, reason="another driver took this run's lease over"
                )
                print("stopping: another driver took this run's lease over")
                return ExitCode.ABORTED
            if preemption.requested and worker.step < steps:
                progress.close()
                saved = worker.step
                if last_saved != worker.step:  # the step just done, written now (a save in flight commits)
                    _checkpoint(worker, checkpointer, journal, sink, goodput, False)
                record_preempted(journal, preemption, worker.step, saved, "")
                return ExitCode.PREEMPTED
        progress.close()
        eval_loss = worker.evaluate()
        sink.eval_loss(eval_loss)
        if last_saved != worker.step:
            _checkpoint(worker, checkpointer, journal, sink, goodput, False, {"eval_loss": eval_loss})
    except CheckpointWriteError:
        journal.record("run_failed", step=worker.step, reason="the final checkpoint could not be written")
        return ExitCode.FAILED
    except UserCodeError as exc:  # not retried: it would raise again; the newest checkpoint stays
        journal.record("user_error", step=worker.step, family=worker.adapter.name, error=str(exc))
        journal.record("run_aborted", step=worker.step, reason="the task's code raised")
        print(f"error in the task's code, the run stops (exit code {int(ExitCode.USER_ERROR)}):\n{exc}")
        return ExitCode.USER_ERROR
    finally:
        with contextlib.suppress(CheckpointWriteError):  # journalled by its callback
            checkpointer.close()
    totals = goodput.snapshot()
    journal.record("goodput", **totals)
    sink.goodput(totals["ratio"], totals["badput_s"])
    journal.record(
        "run_finished",
        step=worker.step,
        loss=worker.last_loss,
        eval_loss=eval_loss,
        family=worker.adapter.name,
        families=[worker.adapter.name],
        goodput=totals["ratio"],
    )
    print(f"finished at step {worker.step}: loss {worker.last_loss:.4f}, held-out loss {eval_loss:.4f}")
    print(f"goodput: {totals['ratio']:.1%} of {totals['wall_s']:.1f} s")
    print(f"the run lives in {home} (journal.jsonl; checkpoints: {manager.root})")
    return ExitCode.FINISHED


@dataclass
class _Pending:
    """Steps done whose losses are still on the device: reported together at each log line as one heartbeat
    (journal, metrics, skipped steps, the task's figures), as a worker group reports a chunk, with one read
    of the losses — the training loop never waits for the device to report a step."""

    worker: Worker
    progress: Progress
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
        samples = worker.config.train.global_batch_size
        for result, loss in zip(self.results, losses, strict=True):
            rate = samples / max(result.step_time_s, 1e-9)
            self.progress.update(result.step, loss, rate, worker.adapter.name, 0)
        self.results.clear()


def _report_restore(restored: Restored, worker: Worker, journal: Journal) -> None:
    for path, why in restored.skipped:
        journal.record("checkpoint_skipped", path=str(path), reason=why)
        print(f"warning: skipped damaged checkpoint {path}: {why}")
    journal.record(
        "resumed",
        path=str(restored.path),
        step=worker.step,
        from_family=restored.manifest.family,
        family=worker.adapter.name,
        rng_restored=restored.rng_restored,
    )
    rng = "restored" if restored.rng_restored else "re-derived from (seed, step, rank)"
    print(
        f"resumed from {restored.path} at step {worker.step} (saved on {restored.manifest.family}; RNG {rng})"
    )


def _checkpoint(
    worker: Worker,
    checkpointer: AsyncCheckpointer,
    journal: Journal,
    sink: MetricsSink,
    goodput: Goodput,
    background: bool,
    metrics: dict[str, float] | None = None,
) -> None:
    """Save in the background (blocking only for the copy), or now; the journal records the commit."""
    step, loss = worker.step, worker.last_loss
    started = time.monotonic()

    def committed(path: Path | str, blocking_s: float) -> None:
        journal.record("checkpoint_saved", step=step, path=str(path), loss=loss, blocking_s=blocking_s)
        sink.checkpoint("commit", time.monotonic() - started, checkpointer.staged_bytes, step)

    if background:
        future = worker.save_async(checkpointer, metrics)
        blocking = checkpointer.last_blocking_s

        def on_done(f: Future[Path | str]) -> None:
            if f.exception() is None:
                committed(f.result(), blocking)
            else:  # training goes on; the previous checkpoint is intact
                journal.record("checkpoint_failed", step=step, error=str(f.exception()))
                print(f"error: {f.exception()}")

        future.add_done_callback(on_done)
    else:
        with contextlib.suppress(CheckpointWriteError):  # journalled by its callback already
            checkpointer.wait()
        try:
            committed(worker.save(checkpointer.manager, metrics), time.monotonic() - started)
        except CheckpointWriteError as exc:
            journal.record("checkpoint_failed", step=step, error=str(exc))
            print(f"error: {exc}")
            raise
    elapsed = time.monotonic() - started
    goodput.bad("checkpoint", elapsed if not background else checkpointer.last_blocking_s)
    sink.checkpoint(
        "save", checkpointer.last_blocking_s if background else elapsed, checkpointer.staged_bytes, step
    )
