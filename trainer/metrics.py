"""The metrics-sink interface the trainer reports to. ``monitoring`` implements it; trainer never imports
``monitoring``. :class:`NullSink` is the do-nothing sink used when metrics are off, so the training code
calls the sink unconditionally.

All durations are seconds, sizes bytes, rates per second (Prometheus base units).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from trainer.errors import UserCodeError
from trainer.journal import Journal


class MetricsSink(ABC):
    @abstractmethod
    def run_info(self, name: str, family: str, world_size: int, total_steps: int) -> None:
        """The run's identity; called at start and whenever the family or world size changes."""

    @abstractmethod
    def steps(
        self,
        step: int,
        loss: float,
        step_times_s: list[float],
        samples: int,
        tokens: int,
        rank_step_time_s: Mapping[int, float],
    ) -> None:
        """A heartbeat: steps completed up to ``step``, their times, the samples/tokens they consumed,
        and each rank's median step time over them."""

    @abstractmethod
    def eval_loss(self, loss: float) -> None:
        """Held-out loss at the current step."""

    @abstractmethod
    def recovery(self, reason: str, seconds: float) -> None:
        """A recovery (worker replaced, group re-formed) by reason, and how long it took."""

    @abstractmethod
    def handover(self, from_family: str, to_family: str, seconds: float) -> None:
        """The run moved to another device family; ``seconds`` from decision to first step there."""

    @abstractmethod
    def checkpoint(self, kind: str, seconds: float, nbytes: int, step: int) -> None:
        """A checkpoint ``save`` (blocking time) / ``commit`` / ``load``: duration and bytes."""

    @abstractmethod
    def probe(
        self,
        family: str,
        busbw_bytes_per_s: float | None,
        baseline_bytes_per_s: float | None,
        latency_s: float | None,
        links: Mapping[str, float],
        degraded: bool,
    ) -> None:
        """An interconnect probe's figures; ``links`` maps "0<->1" to bytes per second."""

    @abstractmethod
    def straggler(self, rank: int) -> None:
        """A rank was flagged as a straggler."""

    @abstractmethod
    def skipped_steps(self, count: int) -> None:
        """``count`` more steps were skipped: their gradients were not finite."""

    @abstractmethod
    def task_metrics(self, values: Mapping[str, float]) -> None:
        """The task's own figures (``Task.metrics``), by name, as last reported."""

    @abstractmethod
    def goodput(self, ratio: float, badput_s: Mapping[str, float]) -> None:
        """Productive training time ÷ wall time, and unproductive seconds by bucket."""

    def close(self) -> None:  # noqa: B027 - optional hook, not part of the contract
        """Stop serving; the default does nothing."""


class NullSink(MetricsSink):
    """Metrics off: every call does nothing."""

    def run_info(self, name: str, family: str, world_size: int, total_steps: int) -> None:
        pass

    def steps(
        self,
        step: int,
        loss: float,
        step_times_s: list[float],
        samples: int,
        tokens: int,
        rank_step_time_s: Mapping[int, float],
    ) -> None:
        pass

    def eval_loss(self, loss: float) -> None:
        pass

    def recovery(self, reason: str, seconds: float) -> None:
        pass

    def handover(self, from_family: str, to_family: str, seconds: float) -> None:
        pass

    def checkpoint(self, kind: str, seconds: float, nbytes: int, step: int) -> None:
        pass

    def probe(
        self,
        family: str,
        busbw_bytes_per_s: float | None,
        baseline_bytes_per_s: float | None,
        latency_s: float | None,
        links: Mapping[str, float],
        degraded: bool,
    ) -> None:
        pass

    def straggler(self, rank: int) -> None:
        pass

    def skipped_steps(self, count: int) -> None:
        pass

    def task_metrics(self, values: Mapping[str, float]) -> None:
        pass

    def goodput(self, ratio: float, badput_s: Mapping[str, float]) -> None:
        pass


def checked_metrics(values: Any, where: str) -> dict[str, float]:
    """A task's metrics as numbers by name; anything else is the task's bug (:class:`UserCodeError`)."""
    if not isinstance(values, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in values.items()
    ):
        raise UserCodeError(
            f"Task.metrics returned {values!r:.200} on {where}; allowed: a dict of numbers by string name"
        )
    return {k: float(v) for k, v in values.items()}


def report_task_metrics(step: int, values: Mapping[str, float], journal: Journal, sink: MetricsSink) -> None:
    """Rank 0's task metrics at ``step``: journalled (not durably: they come with every heartbeat) and
    exported."""
    if values:
        journal.record("task_metrics", durable=False, step=step, **{"values": dict(values)})
        sink.task_metrics(values)
