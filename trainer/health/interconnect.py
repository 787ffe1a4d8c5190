"""Interconnect probe: timed all-reduce per message size and point-to-point per ring link, like nccl-tests.

Device-neutral: it runs over the current default ``torch.distributed`` process group, whatever its backend
(gloo, nccl, hccl), on tensors of the given device, and every rank must call :func:`probe_interconnect`
with the same arguments. All ranks return the same figures: each all-reduce time is the slowest rank's
median, each link's time is measured by its ``src`` rank and shared with the others.

An injected fault profile (:class:`~trainer.faults.CollectiveFaults`) acts inside the timed region of
every collective, so a slow rank slows the links that touch it and an error rate fails the probe. An
error on one rank is agreed on by all ranks at the end of the phase (one size, or the ring), so that the
probe fails everywhere instead of leaving the peers waiting for a rank that gave up.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trainer.faults import CollectiveFaults
from trainer.health.deadline import run_with_deadline
from trainer.health.interconnect_report import (
    LINK_FRACTION,
    BandwidthPoint,
    InterconnectReport,
    LinkReport,
    bandwidth_point,
    common_rank,
    ring_pairs,
    slow_links,
)

#: Bytes each way for the point-to-point test of one ring link.
LINK_BYTES = 1 << 20
#: Timed rounds over the ring links, interleaved; a link's figure is its fastest round, so a few more rounds
#: than the all-reduce's iterations make it a better estimate of what the link can do (they cost ~1 ms each).
LINK_ITERS = 8
_FAULT_SALT = 7
_ELEMENT = torch.float32
_ELEMENT_BYTES = 4


@dataclass
class _Progress:
    """Filled in by the probe thread as it goes, so that a timed-out probe still reports what it measured."""

    stage: str = "starting"
    points: list[BandwidthPoint] = field(default_factory=list)
    links: list[LinkReport] = field(default_factory=list)


@dataclass
class _Context:
    device: torch.device
    rank: int
    world: int
    iters: int
    warmup: int
    faults: CollectiveFaults | None
    link_bytes: int = LINK_BYTES
    link_iters: int = LINK_ITERS
    sync: Callable[[], None] = lambda: None
    #: The first injected error on this rank, until the phase's agreement reports it.
    error: str | None = None
    _rng: random.Random | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = self.faults.rng(salt=_FAULT_SALT) if self.faults is not None else None

    def inject(self, peers: tuple[int, ...]) -> None:
        """The fault profile's delay and error for one collective; an error is remembered, not raised."""
        if self.faults is None or self._rng is None:
            return
        try:
            self.faults.before_collective(self._rng, peers=peers)
        except Exception as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"


class ProbeCollectiveError(RuntimeError):
    """A collective of the probe failed on some rank; every rank raises it for the same phase."""


def probe_interconnect(
    device: torch.device,
    sizes_bytes: Sequence[int] = (4096, 1 << 20, 8 << 20),
    iters: int = 5,
    warmup: int = 1,
    pairwise: bool = True,
    faults: CollectiveFaults | None = None,
    timeout_s: float = 30.0,
    link_bytes: int = LINK_BYTES,
    link_iters: int = LINK_ITERS,
) -> InterconnectReport:
    """Measure the default process group's all-reduce and ring links; call it on every rank at once.

    Always returns a report within about ``timeout_s`` seconds: a failed collective gives ``ok=False`` and
    ``error``; a probe that did not finish (a peer never joined, a collective stalled) gives
    ``timed_out=True`` with the figures measured so far, and its thread is left blocked in the collective —
    the caller must then treat the process group as broken. Raises ``ValueError`` only for invalid
    arguments, before any collective.
    """
    if (
        min(iters, link_iters) < 1
        or warmup < 0
        or link_bytes < _ELEMENT_BYTES
        or min(sizes_bytes, default=1) < 1
    ):
        raise ValueError(
            f"probe_interconnect: iters={iters}, link_iters={link_iters} (>= 1), warmup={warmup} (>= 0), "
            f"link_bytes={link_bytes} (>= {_ELEMENT_BYTES}), sizes_bytes={list(sizes_bytes)} (each >= 1)"
        )
    start = time.monotonic()
    if not (dist.is_available() and dist.is_initialized()):
        return _report(start, _Progress(), 0, 1, "none", error="no default torch.distributed process group")
    rank, world, backend = dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    active = faults if faults is not None and faults.active else None
    ctx = _Context(device, rank, world, iters, warmup, active, link_bytes, link_iters)
    progress = _Progress()
    outcome = run_with_deadline(_measure, timeout_s, ctx, sorted(sizes_bytes), pairwise, progress)
    error = outcome.error
    if outcome.timed_out:
        error = (
            f"interconnect probe stalled in {progress.stage} after {timeout_s:g} s "
            "(a peer did not join, or a collective hung)"
        )
    return _report(start, progress, rank, world, backend, error=error, timed_out=outcome.timed_out)


def alone() -> InterconnectReport:
    """The report of a group of one, which has no process group: nothing between devices to measure."""
    return _report(time.monotonic(), _Progress(), 0, 1, "none")


def _measure(ctx: _Context, sizes: list[int], pairwise: bool, progress: _Progress) -> None:
    ctx.sync = _synchronizer(ctx.device)
    for nbytes in sizes:
        progress.stage = f"all_reduce of {nbytes} bytes"
        progress.points.append(_time_all_reduce(ctx, nbytes))
    if pairwise and ctx.world > 1:
        progress.stage = "ring point-to-point"
        progress.links.extend(_time_ring(ctx))
    progress.stage = "done"


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work, so that the clock is read after the collective really ended."""
    if device.type == "cpu":
        return lambda: None
    module = torch.get_device_module(device.type)
    return lambda: module.synchronize(device)


def _time_all_reduce(ctx: _Context, nbytes: int) -> BandwidthPoint:
    numel = max(1, nbytes // _ELEMENT_BYTES)
    # Zeros stay zeros however often they are summed: no overflow however many iterations.
    buf = torch.zeros(numel, dtype=_ELEMENT, device=ctx.device)
    for _ in range(ctx.warmup):
        dist.all_reduce(buf)
    ctx.sync()
    times = []
    for _ in range(ctx.iters):
        t0 = time.perf_counter()
        ctx.inject(peers=(ctx.rank,))
        dist.all_reduce(buf)
        ctx.sync()
        times.append(time.perf_counter() - t0)
    (seconds,) = _agree(ctx, [statistics.median(times)], f"all_reduce of {numel * _ELEMENT_BYTES} bytes")
    return bandwidth_point(numel * _ELEMENT_BYTES, seconds, ctx.world)


def _time_ring(ctx: _Context) -> list[LinkReport]:
    """Every link once per round, the other ranks idle at a barrier; a ping-pong timed on ``src``.

    A link's figure is its fastest round trip, halved. Rounds interleave the links (A B C A B C ...) so that
    a scheduler hiccup on a shared host costs one sample of each link rather than all samples of one; a
    link that is really slow is slow in every round.
    """
    numel = ctx.link_bytes // _ELEMENT_BYTES
    send = torch.zeros(numel, dtype=_ELEMENT, device=ctx.device)
    recv = torch.empty_like(send)
    pairs = ring_pairs(ctx.world)
    round_trips = [float("inf")] * len(pairs)
    for timed in [False] * ctx.warmup + [True] * ctx.link_iters:
        for k, (src, dst) in enumerate(pairs):
            _barrier(ctx)
            if ctx.rank in (src, dst):
                seconds = _time_link(ctx, src, dst, send, recv, inject=timed)
                if timed and ctx.rank == src:
                    round_trips[k] = min(round_trips[k], seconds)
    mine = [rtt if ctx.rank == src else 0.0 for (src, _), rtt in zip(pairs, round_trips, strict=True)]
    agreed = _agree(ctx, mine, "ring point-to-point")
    nbytes = numel * _ELEMENT_BYTES
    return [
        LinkReport(src, dst, nbytes, rtt / 2, nbytes / max(rtt / 2, 1e-12))
        for (src, dst), rtt in zip(pairs, agreed, strict=True)
    ]


def _time_link(
    ctx: _Context, src: int, dst: int, send: torch.Tensor, recv: torch.Tensor, inject: bool
) -> float:
    """One round trip between ``src`` and ``dst`` (called by both), seconds as seen by the caller."""
    t0 = time.perf_counter()
    if inject:
        ctx.inject(peers=(src, dst))
    if ctx.rank == src:
        dist.send(send, dst)
        dist.recv(recv, dst)
    else:
        dist.recv(recv, src)
        dist.send(send, src)
    ctx.sync()
    return time.perf_counter() - t0


def _barrier(ctx: _Context) -> None:
    # A one-element all-reduce rather than dist.barrier(), which on nccl guesses the device from the rank.
    dist.all_reduce(torch.zeros(1, dtype=_ELEMENT, device=ctx.device))
    ctx.sync()


def _agree(ctx: _Context, values: list[float], what: str) -> list[float]:
    """The element-wise maximum of every rank's ``values``; raises on every rank if any rank had an error."""
    flags = [0.0] * ctx.world
    flags[ctx.rank] = 1.0 if ctx.error else 0.0
    packed = torch.tensor(flags + values, dtype=_ELEMENT, device=ctx.device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    merged = packed.cpu().tolist()
    failed = [r for r, flag in enumerate(merged[: ctx.world]) if flag > 0]
    if failed:
        local = f"; here: {ctx.error}" if ctx.error else ""
        raise ProbeCollectiveError(f"{what} failed on rank(s) {failed}{local}")
    return [float(v) for v in merged[ctx.world :]]


def _report(
    start: float,
    progress: _Progress,
    rank: int,
    world: int,
    backend: str,
    error: str | None = None,
    timed_out: bool = False,
) -> InterconnectReport:
    points, links = tuple(progress.points), tuple(progress.links)
    smallest = min(points, key=lambda p: p.bytes) if points else None
    return InterconnectReport(
        ok=error is None and not timed_out,
        timed_out=timed_out,
        error=error,
        world_size=world,
        backend=backend,
        rank=rank,
        points=points,
        small_message_latency_s=smallest.seconds if smallest else None,
        links=links,
        slowest_link=min(links, key=lambda link: link.bandwidth_bytes_per_s) if links else None,
        slow_rank=common_rank(slow_links(links, LINK_FRACTION)),
        duration_s=time.monotonic() - start,
    )
