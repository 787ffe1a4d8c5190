"""What an interconnect probe found: all-reduce figures per message size, ring links, and which links and
rank stand out. Data and pure functions only; measured by :mod:`trainer.health.interconnect`, judged by
:mod:`trainer.health.assessment`."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: A link below this fraction of the reference link bandwidth is slow (:func:`slow_links`). Looser than the
#: bus-bandwidth criterion because single links vary more: healthy loopback links of 3 gloo ranks on 2 shared
#: cores measured 0.49-0.99 of the reference over 80 probes; an injected slow rank puts its links at ~0.01.
LINK_FRACTION = 0.5


@dataclass(frozen=True)
class BandwidthPoint:
    """All-reduce of one message size: the slowest rank's median seconds and the bandwidths from it."""

    bytes: int
    seconds: float
    algbw_bytes_per_s: float
    #: ``algbw * 2(n-1)/n``: what each rank's link carries in a ring all-reduce (0 on one rank).
    busbw_bytes_per_s: float


@dataclass(frozen=True)
class LinkReport:
    """Point-to-point between ring neighbours ``src`` and ``dst``: one-way seconds for ``bytes`` (half the
    fastest round trip) and the bandwidth from it."""

    src: int
    dst: int
    bytes: int
    seconds: float
    bandwidth_bytes_per_s: float

    @property
    def name(self) -> str:
        return f"{self.src}<->{self.dst}"


@dataclass(frozen=True)
class InterconnectReport:
    """What one rank's call of :func:`probe_interconnect` found. Picklable; :meth:`to_dict` for JSON."""

    ok: bool
    timed_out: bool
    error: str | None
    world_size: int
    backend: str
    rank: int
    points: tuple[BandwidthPoint, ...]
    #: Median all-reduce time of the smallest message size.
    small_message_latency_s: float | None
    links: tuple[LinkReport, ...]
    slowest_link: LinkReport | None
    #: The rank common to every slow link, when there is exactly one such rank.
    slow_rank: int | None
    duration_s: float

    @property
    def busbw_bytes_per_s(self) -> float | None:
        """Bus bandwidth of the largest message size (the figure compared with a baseline)."""
        return max(self.points, key=lambda p: p.bytes).busbw_bytes_per_s if self.points else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "busbw_bytes_per_s": self.busbw_bytes_per_s}


def bandwidth_point(nbytes: int, seconds: float, world_size: int) -> BandwidthPoint:
    """nccl-tests' figures for an all-reduce of ``nbytes`` that took ``seconds`` on ``world_size`` ranks."""
    algbw = nbytes / max(seconds, 1e-12)
    busbw = algbw * 2 * (world_size - 1) / world_size
    return BandwidthPoint(nbytes, seconds, algbw, busbw)


def ring_pairs(world_size: int) -> list[tuple[int, int]]:
    """Links ``i -> (i+1) % n`` of the ring; two ranks share one link, one rank has none."""
    if world_size < 2:
        return []
    if world_size == 2:
        return [(0, 1)]
    return [(i, (i + 1) % world_size) for i in range(world_size)]


def reference_link_bandwidth(links: Sequence[LinkReport]) -> float | None:
    """Median bandwidth of the faster half of the links.

    Not the plain median: a slow rank slows the two ring links that touch it, so on 3 or 4 ranks the plain
    median is itself a slow link and nothing would stand out.
    """
    if not links:
        return None
    ranked = sorted((link.bandwidth_bytes_per_s for link in links), reverse=True)
    return statistics.median(ranked[: (len(ranked) + 1) // 2])


def slow_links(links: Sequence[LinkReport], fraction: float) -> list[LinkReport]:
    """Links below ``fraction`` x :func:`reference_link_bandwidth`, slowest first (none with < 2 links)."""
    reference = reference_link_bandwidth(links)
    if reference is None or len(links) < 2:
        return []
    slow = [link for link in links if link.bandwidth_bytes_per_s < fraction * reference]
    return sorted(slow, key=lambda link: link.bandwidth_bytes_per_s)


def common_rank(links: Sequence[LinkReport]) -> int | None:
    """The one rank every link touches (a slow rank on a ring touches two links), else ``None``."""
    if not links:
        return None
    common = set.intersection(*({link.src, link.dst} for link in links))
    return common.pop() if len(common) == 1 else None
