"""Prometheus exporter: one HTTP endpoint per job, served by the driver, fed by heartbeats.

Implements :class:`trainer.metrics.MetricsSink`. Selected with ``monitoring=prometheus`` (the default);
``monitoring=off`` selects the trainer's do-nothing sink instead. Names follow Prometheus conventions:
base units in the name (``_seconds``, ``_bytes``), ``_total`` for counters.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trainer.errors import ConfigError
from trainer.metrics import MetricsSink

_RECOVERY_ACTIONS = ("retry", "replace_worker", "exclude")
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PrometheusSink(MetricsSink):
    """Serves ``/metrics`` on ``host:port`` from construction until :meth:`close`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9400, port_search: int = 0) -> None:
        self.registry = CollectorRegistry()
        self._define()
        self._last_heartbeat: dict[int, float] = {}
        self.host = host
        self.server, self._thread, self.port = self._serve(host, port, port_search)
        print(f"metrics: http://{host}:{self.port}/metrics")

    def _define(self) -> None:
        r = self.registry
        self.info = Gauge(
            "trainer_run_info", "Run identity (value 1)", ["name", "family", "world_size"], registry=r
        )
        self.world_size = Gauge("trainer_world_size", "Workers in the group", registry=r)
        self.total_steps = Gauge("trainer_total_steps", "Steps the run will train", registry=r)
        self.step = Gauge("trainer_step", "Last completed optimizer step", registry=r)
        self.last_step_time = Gauge(
            "trainer_last_step_timestamp_seconds", "Unix time of the last heartbeat with progress", registry=r
        )
        self.steps_total = Counter("trainer_steps_total", "Optimizer steps completed", registry=r)
        self.samples_total = Counter("trainer_samples_total", "Training samples consumed", registry=r)
        self.tokens_total = Counter("trainer_tokens_total", "Training tokens consumed", registry=r)
        self.samples_rate = Gauge(
            "trainer_samples_per_second", "Samples per second, last heartbeat", registry=r
        )
        self.tokens_rate = Gauge("trainer_tokens_per_second", "Tokens per second, last heartbeat", registry=r)
        self.loss = Gauge("trainer_loss", "Training loss, last step", registry=r)
        self.eval_loss_g = Gauge("trainer_eval_loss", "Held-out loss", registry=r)
        self.step_seconds = Histogram(
            "trainer_step_duration_seconds", "Step time", buckets=_STEP_BUCKETS, registry=r
        )
        self.rank_step = Gauge(
            "trainer_rank_step_duration_seconds",
            "Median step time per rank, last heartbeat",
            ["rank"],
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "trainer_rank_heartbeat_age_seconds",
            "Seconds since the rank's last heartbeat",
            ["rank"],
            registry=r,
        )
        self.recoveries = Counter(
            "trainer_recoveries_total", "Recoveries by the policy's action", ["action"], registry=r
        )
        self.recovery_seconds = Gauge(
            "trainer_last_recovery_duration_seconds", "Last recovery's duration", registry=r
        )
        self.handovers = Counter(
            "trainer_handovers_total",
            "Hand-overs between device families",
            ["from_family", "to_family"],
            registry=r,
        )
        self.handover_seconds = Gauge(
            "trainer_last_handover_duration_seconds", "Decision to first step on the new family", registry=r
        )
        self.ckpt_seconds = Histogram(
            "trainer_checkpoint_duration_seconds",
            "Checkpoint save blocking time, background commit and load durations",
            ["kind"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 120.0),
            registry=r,
        )
        self.ckpt_bytes = Gauge(
            "trainer_checkpoint_bytes", "Bytes of the last checkpoint", ["kind"], registry=r
        )
        self.ckpt_time = Gauge(
            "trainer_last_checkpoint_timestamp_seconds",
            "Unix time of the last committed checkpoint",
            registry=r,
        )
        self.ckpt_step = Gauge(
            "trainer_last_checkpoint_step", "Step of the last committed checkpoint", registry=r
        )
        self.busbw = Gauge(
            "trainer_probe_busbw_bytes_per_second",
            "Interconnect bus bandwidth, last probe",
            ["family"],
            registry=r,
        )
        self.baseline = Gauge(
            "trainer_probe_baseline_busbw_bytes_per_second", "Bus bandwidth baseline", ["family"], registry=r
        )
        self.latency = Gauge(
            "trainer_probe_latency_seconds",
            "Small-message all-reduce latency, last probe",
            ["family"],
            registry=r,
        )
        self.link_bw = Gauge(
            "trainer_probe_link_bandwidth_bytes_per_second",
            "Point-to-point bandwidth per link, last probe",
            ["family", "link"],
            registry=r,
        )
        self.degraded = Counter(
            "trainer_probe_degraded_total",
            "Probes that found the interconnect degraded",
            ["family"],
            registry=r,
        )
        self.stragglers = Counter("trainer_stragglers_total", "Straggler flags by rank", ["rank"], registry=r)
        self.task_metric = Gauge(
            "trainer_task_metric",
            "A figure of the task's own (Task.metrics), last reported",
            ["name"],
            registry=r,
        )
        self.skipped = Counter(
            "trainer_skipped_steps_total", "Steps skipped because their gradients were not finite", registry=r
        )
        self.goodput_ratio = Gauge(
            "trainer_goodput_ratio", "Productive training time / wall time", registry=r
        )
        self.badput = Gauge(
            "trainer_badput_seconds", "Unproductive seconds by bucket", ["bucket"], registry=r
        )

    def _serve(self, host: str, port: int, port_search: int) -> tuple[Any, Any, int]:
        last_error: OSError | None = None
        for candidate in range(port, port + port_search + 1) if port else [0]:
            try:
                server, thread = start_http_server(candidate, addr=host, registry=self.registry)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise ConfigError(
                        f"monitoring.host={host!r}, monitoring.port={candidate}: {exc}"
                    ) from exc
                last_error = exc
                continue
            return server, thread, int(server.server_address[1])
        raise ConfigError(
            f"monitoring.port={port} on {host} is in use"
            + (f" (and the next {port_search})" if port_search else "")
            + f" ({last_error}); allowed: a free port, monitoring.port=0 for any free port, or "
            "monitoring.port_search=N to try the next N ports"
        )

    # --- MetricsSink ---------------------------------------------------------------------------------
    def run_info(self, name: str, family: str, world_size: int, total_steps: int) -> None:
        self.info.clear()
        self.info.labels(name=name, family=family, world_size=str(world_size)).set(1)
        self.world_size.set(world_size)
        self.total_steps.set(total_steps)
        # Known label sets start at 0, so that rate()/increase() see their first event.
        for action in _RECOVERY_ACTIONS:
            self.recoveries.labels(action=action)
        for rank in range(world_size):
            self.stragglers.labels(rank=str(rank))
        self.degraded.labels(family=family)
        for rank in list(self._last_heartbeat):
            if rank >= world_size:
                del self._last_heartbeat[rank]
                self.heartbeat_age.remove(str(rank))
                self.rank_step.remove(str(rank))

    def steps(
        self,
        step: int,
        loss: float,
        step_times_s: list[float],
        samples: int,
        tokens: int,
        rank_step_time_s: Mapping[int, float],
    ) -> None:
        now = time.time()
        self.step.set(step)
        self.last_step_time.set(now)
        self.steps_total.inc(len(step_times_s))
        self.samples_total.inc(samples)
        self.tokens_total.inc(tokens)
        busy = sum(step_times_s)
        if busy > 0:
            self.samples_rate.set(samples / busy)
            self.tokens_rate.set(tokens / busy)
        self.loss.set(loss)
        for seconds in step_times_s:
            self.step_seconds.observe(seconds)
        for rank, seconds in rank_step_time_s.items():
            self.rank_step.labels(rank=str(rank)).set(seconds)
            if rank not in self._last_heartbeat:
                self.heartbeat_age.labels(rank=str(rank)).set_function(self._age_of(rank))
            self._last_heartbeat[rank] = now

    def _age_of(self, rank: int) -> Callable[[], float]:
        return lambda: time.time() - self._last_heartbeat.get(rank, time.time())

    def eval_loss(self, loss: float) -> None:
        self.eval_loss_g.set(loss)

    def recovery(self, reason: str, seconds: float) -> None:
        self.recoveries.labels(action=reason).inc()
        self.recovery_seconds.set(seconds)

    def handover(self, from_family: str, to_family: str, seconds: float) -> None:
        self.handovers.labels(from_family=from_family, to_family=to_family).inc()
        self.handover_seconds.set(seconds)

    def checkpoint(self, kind: str, seconds: float, nbytes: int, step: int) -> None:
        self.ckpt_seconds.labels(kind=kind).observe(seconds)
        self.ckpt_bytes.labels(kind=kind).set(nbytes)
        if kind == "commit":
            self.ckpt_time.set(time.time())
            self.ckpt_step.set(step)

    def probe(
        self,
        family: str,
        busbw_bytes_per_s: float | None,
        baseline_bytes_per_s: float | None,
        latency_s: float | None,
        links: Mapping[str, float],
        degraded: bool,
    ) -> None:
        if busbw_bytes_per_s is not None:
            self.busbw.labels(family=family).set(busbw_bytes_per_s)
        if baseline_bytes_per_s is not None:
            self.baseline.labels(family=family).set(baseline_bytes_per_s)
        if latency_s is not None:
            self.latency.labels(family=family).set(latency_s)
        for link, bandwidth in links.items():
            self.link_bw.labels(family=family, link=link).set(bandwidth)
        if degraded:
            self.degraded.labels(family=family).inc()

    def straggler(self, rank: int) -> None:
        self.stragglers.labels(rank=str(rank)).inc()

    def skipped_steps(self, count: int) -> None:
        self.skipped.inc(count)

    def task_metrics(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.task_metric.labels(name=name).set(value)

    def goodput(self, ratio: float, badput_s: Mapping[str, float]) -> None:
        self.goodput_ratio.set(ratio)
        for bucket, seconds in badput_s.items():
            self.badput.labels(bucket=bucket).set(seconds)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
