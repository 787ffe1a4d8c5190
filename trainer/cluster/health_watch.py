"""Health findings from heartbeats and probes: degraded links, wrong-computing devices, stragglers.

Returns findings as ``(kind, ranks, detail)`` for the controller to turn into policy events; it decides
nothing itself. Interconnect baselines are per family: the configured expectation, else the first
healthy measurement on that family.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from trainer.cluster import calls
from trainer.cluster.watch import ChunkOutcome
from trainer.config import Config
from trainer.goodput import Goodput
from trainer.health.assessment import assess
from trainer.health.device import DeviceReport, compare_results, compare_timings, wrong_ranks
from trainer.journal import Journal
from trainer.metrics import MetricsSink
from trainer.policy import FailureKind

Finding = tuple[FailureKind, tuple[int, ...], str]


class HealthWatch:
    def __init__(self, config: Config, journal: Journal, sink: MetricsSink, goodput: Goodput) -> None:
        self.config = config
        self.journal = journal
        self.sink = sink
        self.goodput = goodput
        #: Measured baselines per (family, message size): a light probe compares with the same size.
        self.baselines: dict[tuple[str, int], float] = {}
        self.strikes: Counter[int] = Counter()
        self.probe_s = 0.0
        self.train_s = 0.0
        #: Duration of the last in-flight probe: what the next one is expected to cost.
        self.last_inflight_s = 0.0

    def probe(self, members: list[Any], family: str, step: int, phase: str) -> Finding | None:
        """Probe every rank (a collective); a finding when a device is wrong or the interconnect degraded.

        ``phase="in-flight"`` runs the light probe first and the full one only when that looks degraded.
        """
        if phase == "in-flight":
            light = self._probe(members, family, step, phase, light=True)
            if light is None or light[0] is not FailureKind.DEGRADED_PROBE:
                return light
            phase = "in-flight (full, after a degraded light probe)"
        return self._probe(members, family, step, phase, light=False)

    def _probe(self, members: list[Any], family: str, step: int, phase: str, light: bool) -> Finding | None:
        cfg = self.config.probes
        sizes = cfg.inflight_sizes_bytes if light else cfg.sizes_bytes
        started = time.monotonic()
        refs = [m.probe.remote(list(sizes), cfg.iters, cfg.timeout_s, not light) for m in members]
        try:
            replies = calls.get(refs, timeout=cfg.timeout_s * 2 + 30)
        except calls.lost_errors():
            raise  # a worker gone during the probe is a worker loss, not a finding about the interconnect
        except calls.call_errors() as exc:
            return FailureKind.DEGRADED_PROBE, (), f"{phase} probe failed: {exc}"
        elapsed = time.monotonic() - started
        if phase.startswith("in-flight"):
            self.probe_s += elapsed
            self.last_inflight_s = elapsed
            self.goodput.bad("probe", elapsed)
        report = replies[0]["interconnect"]
        size = max(p.bytes for p in report.points) if report.points else 0
        baseline = cfg.baseline_busbw.get(family, self.baselines.get((family, size)))
        verdict = assess(report, baseline, cfg.degraded_fraction)
        if verdict.healthy and report.ok and family not in cfg.baseline_busbw:
            for point in report.points:  # the first healthy measurement of each size is the baseline
                self.baselines.setdefault((family, point.bytes), point.busbw_bytes_per_s)
        self.sink.probe(
            family,
            report.busbw_bytes_per_s,
            verdict.baseline,
            report.small_message_latency_s,
            {link.name: link.bandwidth_bytes_per_s for link in report.links},
            verdict.degraded,
        )
        devices = {r["rank"]: r["device"] for r in replies}
        wrong = wrong_ranks(devices)
        bitwise = compare_results(devices)
        unhealthy = tuple(rank for rank in sorted(devices) if devices[rank].device_unhealthy)
        vendor = [
            {"rank": rank, **asdict(finding)}
            for rank in sorted(devices)
            if devices[rank].vendor is not None
            for finding in devices[rank].vendor.findings  # type: ignore[union-attr]
        ]
        slow_devices = compare_timings({r["rank"]: r["device"].matmul_s for r in replies if r["device"].ok})
        self.journal.record(
            "probe",
            phase=phase,
            family=family,
            step=step,
            duration_s=elapsed,
            healthy=verdict.healthy and not wrong and not unhealthy,
            degraded=verdict.degraded,
            reason=verdict.reason,
            busbw_bytes_per_s=verdict.busbw_bytes_per_s,
            baseline_bytes_per_s=verdict.baseline,
            slowest_link=None
            if report.slowest_link is None
            else [report.slowest_link.src, report.slowest_link.dst],
            slow_rank=report.slow_rank,
            wrong_compute_ranks=list(wrong),
            bitwise_disagreeing_ranks=list(bitwise.disagreeing),
            bitwise_undecided_ranks=list(bitwise.undecided),
            unhealthy_device_ranks=list(unhealthy),
            vendor_findings=vendor,
            vendor_skipped=_skipped(devices),
            slow_device_ranks=slow_devices,
            cost_fraction=self.cost_fraction(),
            interconnect=report.to_dict(),
        )
        if wrong:
            return (
                FailureKind.WRONG_COMPUTE,
                wrong,
                f"device probe: matmul result wrong on ranks {list(wrong)} (against the float64 reference "
                f"or bitwise against the other ranks)",
            )
        if unhealthy:
            details = "; ".join(f"rank {v['rank']}: {v['tool']}: {v['detail']}" for v in vendor)
            return FailureKind.DEVICE_UNHEALTHY, unhealthy, f"vendor health tools: {details}"
        if report.timed_out:
            # A thread is still blocked in the probe's collective: the group must be re-formed.
            return FailureKind.COLLECTIVE_FAILED, (), f"{phase} probe timed out: {report.error}"
        if verdict.degraded:
            return FailureKind.DEGRADED_PROBE, (), f"{phase} probe: {verdict.reason}"
        return None

    def after_chunk(
        self, members: list[Any], family: str, step: int, outcome: ChunkOutcome
    ) -> Finding | None:
        """Straggler bookkeeping for a healthy chunk that ended at ``step``, then the in-flight probe when
        one is due."""
        self.train_s += sum(outcome.results[0]["step_times"])
        finding = self._stragglers(family, step, outcome)
        if finding is not None:
            return finding
        interval = self.config.probes.interval_steps
        if not interval or step % interval or step >= self.config.train.steps:
            return None
        budget = self.config.probes.max_cost_fraction
        if (self.probe_s + self.last_inflight_s) > budget * self.train_s:
            self.journal.record(
                "probe_skipped",
                step=step,
                family=family,
                cost_fraction=self.cost_fraction(),
                max_cost_fraction=budget,
            )
            return None
        return self.probe(members, family, step, "in-flight")

    def _stragglers(self, family: str, step: int, outcome: ChunkOutcome) -> Finding | None:
        ft = self.config.fault_tolerance
        per_rank = {
            rank: statistics.median(r["compute_times"])
            for rank, r in outcome.results.items()
            if r["compute_times"]
        }
        if len(per_rank) < 2:
            return None
        median = statistics.median(per_rank.values())
        flagged = sorted(
            r
            for r, t in per_rank.items()
            if t > ft.straggler_factor * median and t - median >= ft.straggler_floor_s
        )
        for rank in flagged:
            self.strikes[rank] += 1
            self.sink.straggler(rank)
            self.journal.record(
                "straggler_flagged",
                rank=rank,
                family=family,
                step=step,
                compute_s=per_rank[rank],
                median_s=median,
                factor=ft.straggler_factor,
                floor_s=ft.straggler_floor_s,
                strikes=self.strikes[rank],
            )
        out = tuple(r for r in flagged if self.strikes[r] >= ft.straggler_strikes)
        for rank in set(self.strikes) - set(flagged):
            self.strikes[rank] = 0  # strikes count consecutive chunks
        if out:
            for rank in out:
                self.strikes[rank] = 0
            return (
                FailureKind.STRAGGLER,
                out,
                f"compute time > {ft.straggler_factor} x median (and >= {ft.straggler_floor_s} s above it) "
                "in consecutive chunks",
            )
        return None

    def cost_fraction(self) -> float:
        """In-flight probing time as a fraction of training time so far (preflight probes excluded)."""
        return self.probe_s / self.train_s if self.train_s > 0 else 0.0


def _skipped(devices: dict[int, DeviceReport]) -> dict[str, str]:
    """The vendor tools not read and why, from the first rank that ran the probe (the same on every host
    of one family, as a rule)."""
    for rank in sorted(devices):
        report = devices[rank].vendor
        if report is not None:
            return dict(report.skipped)
    return {}
