"""One run lifecycle: what the driver decides and records over a run's life, whichever group it drives —
a Ray worker group, or a group of one in the driver's process (:mod:`trainer.cluster.one_process`).

The controller (:mod:`trainer.cluster.controller`) calls these functions at the same points of the run for
every group, so a run's journal, exported figures and printed lines are the same on each:

1. :func:`record_started` — the run's identity (``run_started``); :func:`record_group` for each group;
2. :func:`report_restore` — what a resume found (``checkpoint_skipped``, ``resumed``);
3. :func:`checkpoint_due` — the checkpoint cadence; :func:`record_staged`, :func:`record_committed`,
   :func:`record_save_failed` — each save (``checkpoint_started``, ``checkpoint_saved``,
   ``checkpoint_failed``), with the goodput account journalled at each (:func:`record_goodput`), so a
   re-launched driver continues it;
4. the end, one of: :func:`record_finished` (``run_finished``), :func:`record_failed` (``run_failed``: the
   final checkpoint could not be written), :func:`record_user_error` (``user_error``, ``run_aborted``),
   :func:`record_lease_lost` (``lease_lost``), :func:`trainer.preemption.record_preempted` (``preempted``);
5. :func:`print_summary` — the run's story from its journal.

Nothing here imports Ray or torch: how a save or an evaluation reaches the members stays each path's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import ExitCode
from trainer.goodput import Goodput
from trainer.journal import Journal
from trainer.metrics import MetricsSink
from trainer.summary import format_summary, summarize


def checkpoint_due(step: int, interval: int, total: int) -> bool:
    """Whether a periodic checkpoint of ``step`` is due: every ``interval`` steps (0: never), but not at the
    last step, which the run's end saves with its held-out loss."""
    return interval > 0 and step % interval == 0 and step < total


def record_started(
    journal: Journal, run_dir: Path, family: str, world_size: int, name: str, mode: str, where: str, root: Any
) -> None:
    """The run (or a re-launched driver of it) starts: ``where`` says how its members are reached."""
    journal.record(
        "run_started", run_dir=str(run_dir), family=family, world_size=world_size, name=name, mode=mode
    )
    print(f"run directory: {run_dir}")
    print(f"device family: {where}, checkpoints: {root}")


def record_group(
    journal: Journal,
    sink: MetricsSink,
    config_name: str,
    total_steps: int,
    family: str,
    step: int,
    members: list[dict[str, Any]],
    spares: list[dict[str, Any]],
) -> None:
    """A group of ``members`` starts training on ``family`` at ``step``."""
    sink.run_info(config_name, family, len(members), total_steps)
    journal.record(
        "group_started", family=family, world_size=len(members), step=step, members=members, spares=spares
    )


@dataclass(frozen=True)
class RestoreReport:
    """What a member's restore found: the checkpoint loaded (None: none, the run starts from step 0) and
    the damaged newer ones it skipped."""

    path: str | None
    step: int
    #: The family the checkpoint was saved on.
    saved_on: str
    rng_restored: bool
    metrics: dict[str, float]
    skipped: list[tuple[str, str]]

    @classmethod
    def of(cls, reply: dict[str, Any]) -> RestoreReport:
        """From a restore's plain data (``trainer.checkpoint.Restored.reply``)."""
        return cls(
            path=reply["path"],
            step=int(reply["step"]),
            saved_on=reply["family"],
            rng_restored=reply["rng_restored"],
            metrics=reply["metrics"],
            skipped=[(str(p), why) for p, why in reply["skipped"]],
        )


def report_restore(journal: Journal, report: RestoreReport, family: str) -> None:
    """Journal and say what a restore on ``family`` found (nothing when there was no checkpoint)."""
    for path, why in report.skipped:
        journal.record("checkpoint_skipped", path=path, reason=why)
        print(f"warning: skipped damaged checkpoint {path}: {why}")
    if report.path is None:
        return
    journal.record(
        "resumed",
        path=report.path,
        step=report.step,
        from_family=report.saved_on,
        family=family,
        rng_restored=report.rng_restored,
        metrics=report.metrics,
    )
    rng = "restored" if report.rng_restored else "re-derived from (seed, step, rank)"
    print(f"resumed from {report.path} at step {report.step} (saved on {report.saved_on}; RNG {rng})")


def record_goodput(journal: Journal, sink: MetricsSink, goodput: Goodput) -> dict[str, Any]:
    """Journal and export the goodput account so far (a re-launched driver continues from it)."""
    totals = goodput.snapshot()
    journal.record("goodput", **totals)
    sink.goodput(totals["ratio"], totals["badput_s"])
    return totals


def record_staged(
    journal: Journal,
    sink: MetricsSink,
    goodput: Goodput,
    step: int,
    held_s: float,
    blocking_s: float,
    nbytes: int,
    blocking_s_per_rank: list[float] | None = None,
) -> None:
    """A checkpoint of ``step`` is staged and commits in the background: training was held ``held_s``
    (goodput's ``checkpoint`` bucket), of which ``blocking_s`` the copy of the state (with sharded state,
    every rank's too)."""
    goodput.bad("checkpoint", held_s)
    sink.checkpoint("save", blocking_s, nbytes, step)
    fields: dict[str, Any] = {"step": step, "blocking_s": blocking_s}
    if blocking_s_per_rank is not None:
        fields["blocking_s_per_rank"] = blocking_s_per_rank
    journal.record("checkpoint_started", **fields)
    record_goodput(journal, sink, goodput)


def record_committed(
    journal: Journal, sink: MetricsSink, path: str, step: int, nbytes: int, seconds: float = 0.0
) -> None:
    """The checkpoint of ``step`` is committed at ``path`` (``seconds`` after it was begun, where known)."""
    journal.record("checkpoint_saved", path=path, step=step)
    sink.checkpoint("commit", seconds, nbytes, step)


def record_save_failed(journal: Journal, step: int, error: str, say: Callable[[str], None] = print) -> None:
    """A save of ``step`` was not committed; the previous checkpoint is intact and training goes on."""
    journal.record("checkpoint_failed", error=error, step=step)
    say(f"error: {error}")


def record_finished(
    journal: Journal,
    sink: MetricsSink,
    step: int,
    loss: float,
    eval_loss: float,
    families: list[str],
    recoveries: int,
    totals: dict[str, Any],
) -> ExitCode:
    """The run trained to its last step, which is saved: ``run_finished``."""
    sink.eval_loss(eval_loss)
    journal.record(
        "run_finished",
        step=step,
        loss=loss,
        eval_loss=eval_loss,
        family=families[-1],
        families=families,
        recoveries=recoveries,
        goodput=totals["ratio"],
    )
    print(f"finished at step {step} on {families[-1]}: loss {loss:.4f}, held-out {eval_loss:.4f}")
    return ExitCode.FINISHED


def record_failed(journal: Journal, step: int, error: str) -> ExitCode:
    """The run trained to its last step but its final checkpoint could not be written: ``run_failed``."""
    reason = "the final checkpoint could not be written"
    journal.record("run_failed", step=step, reason=reason, error=error)
    print(f"failed at step {step}: {reason} (exit code {int(ExitCode.FAILED)})")
    return ExitCode.FAILED


def record_user_error(
    journal: Journal, step: int, family: str, message: str, settle: Callable[[], object] = lambda: None
) -> ExitCode:
    """The user's code raised: the run stops now. Not an event for the policy — a retry or another family
    would raise it again. ``settle`` lets a save in flight commit, so the newest checkpoint stays."""
    journal.record("user_error", step=step, family=family, error=message)
    settle()
    journal.record("run_aborted", step=step, reason="the task's code raised")
    print(f"error in the task's code, the run stops (exit code {int(ExitCode.USER_ERROR)}):\n{message}")
    return ExitCode.USER_ERROR


def record_lease_lost(journal: Journal, step: int) -> str:
    """Another driver took the run over (this one was paused past the lease's staleness); returns why the
    run stops. Its saves are refused by the fence anyway."""
    reason = "another driver took this run's lease over"
    journal.record("lease_lost", step=step, reason=reason)
    print(f"stopping: {reason}")
    return reason


def print_summary(journal: Journal, run_dir: Path, root: Any) -> None:
    """The run's story, read back from its journal, and where it lives."""
    print("\n== summary\n" + format_summary(summarize(journal.read())))
    print(f"the run lives in {run_dir} (journal.jsonl; checkpoints: {root})")
