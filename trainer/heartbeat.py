"""A chunk's replies as one heartbeat: the steps done, their losses and times, journalled and exported."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from trainer.config import Config
from trainer.journal import Journal
from trainer.metrics import MetricsSink, report_task_metrics
from trainer.nonfinite import report_skipped


@dataclass(frozen=True)
class Heartbeat:
    first_step: int
    #: The step every rank has completed.
    step: int
    #: Per step, the mean over the ranks.
    losses: list[float]
    #: Per step, rank 0's time (the ranks step in lockstep).
    step_times: list[float]
    #: Median step time per rank.
    rank_step_s: dict[int, float]
    #: Steps skipped because their gradients were not finite (the same on every rank).
    skipped_steps: list[int]
    #: Rank 0's figures of the task's own (Task.metrics) at the end of the chunk.
    task_metrics: dict[str, float]

    @classmethod
    def of(cls, results: dict[int, dict[str, Any]], until: int) -> Heartbeat:
        """The heartbeat of a chunk every rank finished at step ``until``, from each rank's reply."""
        first = results[0]
        n = len(first["losses"])
        return cls(
            first_step=until - n + 1,
            step=until,
            # Per step, the mean over the ranks (as statistics.fmean: fsum / n, without its per-item cost).
            losses=[
                math.fsum(step) / len(step)
                for step in zip(*(r["losses"][:n] for r in results.values()), strict=True)
            ],
            step_times=list(first["step_times"]),
            rank_step_s={
                rank: statistics.median(r["step_times"]) for rank, r in results.items() if r["step_times"]
            },
            skipped_steps=list(first.get("skipped_steps", [])),
            task_metrics=dict(first.get("task_metrics", {})),
        )

    @property
    def median_step_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None

    def record(
        self,
        journal: Journal,
        sink: MetricsSink,
        config: Config,
        family: str,
        loss: float,
        tokens_per_sample: int | None = None,
    ) -> None:
        """Journal it (not durably: heartbeats are many) and export the steps' figures (``tokens_per_sample``:
        default, the built-in model's ``seq_len``)."""
        journal.record(
            "heartbeat",
            durable=False,
            first_step=self.first_step,
            step=self.step,
            busy_s=sum(self.step_times),
            family=family,
            loss=loss,
            step_time_s=self.median_step_s,
        )
        samples = len(self.losses) * config.train.global_batch_size
        tokens = samples * (_seq_len(config) if tokens_per_sample is None else tokens_per_sample)
        sink.steps(self.step, loss, list(self.step_times), samples, tokens, self.rank_step_s)
        if self.skipped_steps:
            report_skipped(self.skipped_steps, family, journal, sink)
        report_task_metrics(self.step, self.task_metrics, journal, sink)


def _seq_len(config: Config) -> int:
    model = config.model
    return int(model.get("seq_len", 0) if isinstance(model, dict) else getattr(model, "seq_len", 0))
