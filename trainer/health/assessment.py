"""Judging an interconnect report: healthy or degraded against a baseline bus bandwidth and the other
links, and why. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.health.interconnect_report import (
    LINK_FRACTION,
    InterconnectReport,
    reference_link_bandwidth,
    slow_links,
)


@dataclass(frozen=True)
class Assessment:
    """Whether one interconnect report is healthy, and why not."""

    healthy: bool
    degraded: bool
    reason: str
    #: The report's bus bandwidth at its largest message size.
    busbw_bytes_per_s: float | None
    #: The baseline compared against: the given one, or the report's own figure when none was given.
    baseline: float | None


def assess(
    report: InterconnectReport,
    baseline_busbw_bytes_per_s: float | None,
    degraded_fraction: float = 0.8,
    link_fraction: float = LINK_FRACTION,
) -> Assessment:
    """Judge ``report``. Degraded when the probe failed or timed out, when the largest size's bus bandwidth
    is below ``degraded_fraction`` x the baseline, or when a link is below ``link_fraction`` x the
    reference link bandwidth (:func:`reference_link_bandwidth`); the reason names the slowest link and the
    slow rank where known. With no baseline a healthy report becomes the baseline (returned in
    ``baseline``); a degraded one never does. Pure; raises ``ValueError`` for a fraction outside (0, 1].
    """
    for name, value in (("degraded_fraction", degraded_fraction), ("link_fraction", link_fraction)):
        if not 0 < value <= 1:
            raise ValueError(f"{name}={value}; allowed: a float in (0, 1]")
    busbw, baseline = report.busbw_bytes_per_s, baseline_busbw_bytes_per_s
    if not report.ok:
        what = "timed out" if report.timed_out else "failed"
        return Assessment(False, True, f"interconnect probe {what}: {report.error}", busbw, baseline)
    findings = _busbw_findings(report, baseline, degraded_fraction) + _link_findings(report, link_fraction)
    if findings:
        return Assessment(False, True, "; ".join(findings + _culprits(report, findings)), busbw, baseline)
    if baseline is None:
        return Assessment(True, False, "no baseline: this measurement becomes the baseline", busbw, busbw)
    reason = f"bus bandwidth {_gbps(busbw or 0.0)} within {degraded_fraction:g} x baseline {_gbps(baseline)}"
    return Assessment(True, False, reason, busbw, baseline)


def _busbw_findings(report: InterconnectReport, baseline: float | None, fraction: float) -> list[str]:
    busbw = report.busbw_bytes_per_s
    # One rank has no interconnect: its bus bandwidth is 0 by definition, not degraded.
    if baseline is None or busbw is None or report.world_size < 2 or busbw >= fraction * baseline:
        return []
    return [f"bus bandwidth {_gbps(busbw)} is below {fraction:g} x baseline {_gbps(baseline)}"]


def _link_findings(report: InterconnectReport, fraction: float) -> list[str]:
    slow = slow_links(report.links, fraction)
    if not slow:
        return []
    reference = reference_link_bandwidth(report.links) or 0.0
    return [
        f"link {slow[0].name} at {_gbps(slow[0].bandwidth_bytes_per_s)} is below {fraction:g} x "
        f"the reference link bandwidth {_gbps(reference)}"
    ]


def _culprits(report: InterconnectReport, findings: list[str]) -> list[str]:
    """The slowest link (unless a finding already names a link) and the slow rank."""
    found = []
    if report.slowest_link is not None and not any(f.startswith("link ") for f in findings):
        link = report.slowest_link
        found.append(f"slowest link {link.name} at {_gbps(link.bandwidth_bytes_per_s)}")
    if report.slow_rank is not None:
        found.append(f"slow rank {report.slow_rank}")
    return found


def _gbps(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.3g} GB/s"
