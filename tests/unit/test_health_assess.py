"""assess() and compare_timings() decide from figures alone; run_with_deadline never blocks or raises."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from trainer.health import (
    InterconnectReport,
    LinkReport,
    assess,
    bandwidth_point,
    compare_timings,
    run_with_deadline,
)
from trainer.health.interconnect_report import common_rank, ring_pairs, slow_links

GB = 1e9


def _link(src: int, dst: int, gbps: float) -> LinkReport:
    seconds = (1 << 20) / (gbps * GB)
    return LinkReport(src, dst, 1 << 20, seconds, gbps * GB)


def _report(
    busbw_gbps: float = 10.0,
    links: tuple[float, ...] = (),
    ok: bool = True,
    timed_out: bool = False,
    world: int = 4,
) -> InterconnectReport:
    """A report whose largest size has bus bandwidth ``busbw_gbps`` and ring links of the given speeds."""
    nbytes = 8 << 20
    seconds = nbytes * 2 * (world - 1) / world / (busbw_gbps * GB)
    points = (bandwidth_point(4096, 1e-5, world), bandwidth_point(nbytes, seconds, world))
    ring = tuple(_link(i, (i + 1) % len(links), g) for i, g in enumerate(links))
    slowest = min(ring, key=lambda link: link.bandwidth_bytes_per_s) if ring else None
    return InterconnectReport(
        ok=ok and not timed_out,
        timed_out=timed_out,
        error=None if ok and not timed_out else "boom",
        world_size=world,
        backend="gloo",
        rank=0,
        points=points,
        small_message_latency_s=1e-5,
        links=ring,
        slowest_link=slowest,
        slow_rank=None,
        duration_s=0.1,
    )


@pytest.mark.parametrize(
    ("report", "baseline", "healthy", "in_reason", "adopted"),
    [
        (_report(10.0), None, True, "becomes the baseline", 10.0),
        (_report(10.0), 10.0, True, "within", 10.0),
        (_report(8.5), 10.0, True, "within", 10.0),
        (_report(7.9), 10.0, False, "bus bandwidth", 10.0),
        (_report(1.0, world=1), 10.0, True, "within", 10.0),  # one rank: no interconnect to judge
        (_report(10.0, links=(5, 5, 5, 5)), 10.0, True, "within", 10.0),
        (_report(10.0, links=(5, 1, 5, 5)), 10.0, False, "link 1<->2", 10.0),
        (_report(10.0, links=(5, 3, 5, 5)), 10.0, True, "within", 10.0),  # links vary: half speed to count
        # A slow rank slows both its ring links; the plain median of 3 links would be a slow one.
        (_report(10.0, links=(1, 1, 5), world=3), 10.0, False, "link 0<->1", 10.0),
        (_report(10.0, links=(5, 1, 5, 5)), None, False, "link 1<->2", None),  # never adopt a bad baseline
        (_report(5.0, links=(5, 5, 5, 4)), 10.0, False, "slowest link 3<->0", 10.0),
        (_report(ok=False), 10.0, False, "failed: boom", 10.0),
        (_report(timed_out=True), None, False, "timed out: boom", None),
    ],
)
def test_assess(
    report: InterconnectReport, baseline: float | None, healthy: bool, in_reason: str, adopted: float | None
) -> None:
    verdict = assess(report, None if baseline is None else baseline * GB)
    assert verdict.healthy is healthy
    assert verdict.degraded is not healthy
    assert in_reason in verdict.reason
    assert verdict.baseline == (None if adopted is None else pytest.approx(adopted * GB))
    assert verdict.busbw_bytes_per_s == report.busbw_bytes_per_s


def test_assess_rejects_a_fraction_outside_0_1() -> None:
    with pytest.raises(ValueError, match="degraded_fraction"):
        assess(_report(), None, degraded_fraction=1.5)
    with pytest.raises(ValueError, match="link_fraction"):
        assess(_report(), None, link_fraction=0.0)


def test_link_fraction_is_its_own_knob() -> None:
    report = _report(10.0, links=(5, 3, 5, 5))
    verdict = assess(report, 10 * GB, link_fraction=0.8)
    assert verdict.degraded and "link 1<->2 at 3 GB/s is below 0.8 x" in verdict.reason


def test_ring_pairs() -> None:
    assert ring_pairs(1) == []
    assert ring_pairs(2) == [(0, 1)]
    assert ring_pairs(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]


@pytest.mark.parametrize(
    ("speeds", "slow", "rank"),
    [
        ((5, 5, 5, 5), [], None),
        ((5, 0.1, 0.2, 5), ["1<->2", "2<->3"], 2),  # both links of rank 2
        ((0.1, 5, 5, 5), ["0<->1"], None),  # one slow link: a cable or either end, no rank to name
        ((0.1, 0.1, 5), ["0<->1", "1<->2"], 1),
        ((0.1, 5, 0.1, 5), ["0<->1", "2<->3"], None),  # two unrelated slow links
        ((0.1,), [], None),  # nothing to compare with
    ],
)
def test_slow_links_and_the_rank_they_share(
    speeds: tuple[float, ...], slow: list[str], rank: int | None
) -> None:
    links = [_link(i, (i + 1) % len(speeds), g) for i, g in enumerate(speeds)]
    found = slow_links(links, 0.5)
    assert [link.name for link in found] == slow
    assert common_rank(found) == rank


def test_bandwidth_point_is_nccl_tests_arithmetic() -> None:
    point = bandwidth_point(1 << 20, 1e-3, 4)
    assert point.algbw_bytes_per_s == pytest.approx((1 << 20) / 1e-3)
    assert point.busbw_bytes_per_s == pytest.approx(point.algbw_bytes_per_s * 1.5)
    assert bandwidth_point(1 << 20, 1e-3, 1).busbw_bytes_per_s == 0.0


def test_report_pickles_and_serialises() -> None:
    report = _report(links=(5, 1, 5, 5))
    assert pickle.loads(pickle.dumps(report)) == report
    d = report.to_dict()
    assert d["slowest_link"] == {"src": 1, "dst": 2, "bytes": 1 << 20, **_timing(report.slowest_link)}
    assert d["busbw_bytes_per_s"] == pytest.approx(10 * GB)


def _timing(link: LinkReport | None) -> dict[str, float]:
    assert link is not None
    return {"seconds": link.seconds, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s}


@pytest.mark.parametrize(
    ("times", "factor", "slow"),
    [
        ({}, 1.4, []),
        ({0: 1.0}, 1.4, []),
        ({0: 1.0, 1: 1.0, 2: 1.0}, 1.4, []),
        ({0: 1.0, 1: 1.1, 2: 2.0}, 1.4, [2]),
        ({0: 1.0, 1: 1.4, 2: 1.0}, 1.4, []),  # exactly factor x median is not slower
        ({3: 5.0, 0: 1.0, 1: 1.0, 2: 4.0}, 1.4, [2, 3]),
        ({0: 1.0, 1: 1.3, 2: 1.0}, 1.2, [1]),
        ({0: 0.0, 1: 0.0}, 1.4, []),
    ],
)
def test_compare_timings(times: dict[int, float], factor: float, slow: list[int]) -> None:
    assert compare_timings(times, factor) == slow


def test_deadline_returns_the_value() -> None:
    result = run_with_deadline(lambda a, b=0: a + b, 5.0, 2, b=3)
    assert (result.ok, result.value, result.error, result.timed_out) == (True, 5, None, False)


def test_deadline_abandons_a_call_that_never_returns() -> None:
    forever = threading.Event()
    result = run_with_deadline(forever.wait, 0.2)  # returns: that is the point
    assert result.timed_out is True
    assert result.ok is False
    assert result.value is None
    assert "did not finish" in (result.error or "")


def test_deadline_reports_an_exception_instead_of_raising() -> None:
    def fail() -> None:
        raise KeyboardInterrupt("even a BaseException")

    result = run_with_deadline(fail, 5.0)
    assert (result.ok, result.timed_out) == (False, False)
    assert result.error == "KeyboardInterrupt: even a BaseException"


def test_deadline_sleeping_function() -> None:
    result = run_with_deadline(time.sleep, 0.1, 3600)
    assert result.timed_out is True
