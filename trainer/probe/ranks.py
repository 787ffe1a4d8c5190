"""The probes on every rank of a group, and their summary: ranks spawned on this host that meet through a
TCPStore, or the ranks of a torchrun job; each runs the interconnect probe over the family's backend and a
device probe of its own device."""

from __future__ import annotations

import os
import queue
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.devices import get_adapter
from trainer.devices.base import DeviceAdapter
from trainer.devices.join import join_group
from trainer.faults import BitFlip, CollectiveFaults
from trainer.health import (
    DeviceReport,
    InterconnectReport,
    assess,
    compare_results,
    compare_timings,
    probe_device,
    probe_interconnect,
    run_with_deadline,
    wrong_ranks,
)

#: Seconds a spawned rank may take to start (import torch, join the group) on top of the probe deadlines.
_START_GRACE_S = 60.0


@dataclass(frozen=True)
class ProbeOptions:
    """Everything a rank needs to run the probes (picklable: it travels to spawned processes)."""

    device: str = "cpu"
    sizes_bytes: tuple[int, ...] = (4096, 1 << 20, 8 << 20)
    iters: int = 5
    warmup: int = 1
    pairwise: bool = True
    timeout_s: float = 30.0
    baseline_busbw: float | None = None
    degraded_fraction: float = 0.8
    delay_s: float = 0.0
    slow_rank: int | None = None
    slow_rank_delay_s: float = 0.05
    error_rate: float = 0.0
    wrong_compute_rank: int | None = None
    #: ``(rank, bit)``: flip this bit of one result element of the rank's device probe (a silent corruption).
    flip_bit: tuple[int, int] | None = None
    #: Searched for the vendors' health tools before PATH (stand-ins for simulated families).
    vendor_tools_dir: str | None = None

    def faults(self, rank: int) -> CollectiveFaults:
        slow = (self.slow_rank,) if self.slow_rank is not None else ()
        return CollectiveFaults(
            rank=rank,
            delay_s=self.delay_s,
            slow_ranks=slow,
            slow_rank_delay_s=self.slow_rank_delay_s,
            error_rate=self.error_rate,
        )


def probe_rank(
    options: ProbeOptions, rank: int, adapter: DeviceAdapter, device: torch.device
) -> tuple[InterconnectReport, DeviceReport]:
    """Both probes on this rank of the current default group (collective); never raises. ``adapter`` is the
    one that bound ``device``."""
    interconnect = probe_interconnect(
        device,
        sizes_bytes=options.sizes_bytes,
        iters=options.iters,
        warmup=options.warmup,
        pairwise=options.pairwise,
        faults=options.faults(rank),
        timeout_s=options.timeout_s,
    )
    wrong = options.wrong_compute_rank == rank
    flip = None
    if options.flip_bit is not None and options.flip_bit[0] == rank:
        flip = BitFlip(element=0, bit=options.flip_bit[1])
    return interconnect, probe_device(
        adapter,
        device,
        faults_wrong_compute=wrong,
        timeout_s=options.timeout_s,
        bit_flip=flip,
        vendor_tools_dir=options.vendor_tools_dir,
    )


def summarise(
    options: ProbeOptions,
    interconnect: InterconnectReport | None,
    devices: dict[int, DeviceReport],
    errors: dict[int, str],
) -> dict[str, Any]:
    """The command's result: reports, verdict and findings, JSON-ready. ``healthy`` decides the exit code."""
    verdict = None
    if interconnect is not None:
        verdict = assess(interconnect, options.baseline_busbw, options.degraded_fraction)
    wrong = list(wrong_ranks(devices))
    bitwise = compare_results(devices)
    unhealthy = sorted(r for r, d in devices.items() if d.device_unhealthy)
    failed = sorted(
        r for r, d in devices.items() if not d.ok and not d.wrong_result and not d.device_unhealthy
    )
    timings = {r: d.matmul_s for r, d in devices.items() if d.ok and d.matmul_s is not None}
    healthy = verdict is not None and verdict.healthy and not (wrong or unhealthy or failed or errors)
    return {
        "healthy": healthy,
        "device_family": options.device,
        "interconnect": None if interconnect is None else interconnect.to_dict(),
        "assessment": None if verdict is None else asdict(verdict),
        "devices": {str(r): devices[r].to_dict() for r in sorted(devices)},
        "wrong_compute_ranks": wrong,
        "bitwise_disagreeing_ranks": list(bitwise.disagreeing),
        "bitwise_undecided_ranks": list(bitwise.undecided),
        "failed_device_ranks": failed,
        "unhealthy_device_ranks": unhealthy,
        # Informational only: ranks sharing one host's CPUs make matmul times too noisy to fail on.
        "slow_device_ranks": compare_timings(timings),
        "rank_errors": {str(r): e for r, e in sorted(errors.items())},
    }


def _join_group(adapter: DeviceAdapter, rank: int, world: int, timeout_s: float, port: int | None) -> None:
    """Join with the family's backend timeouts (process group and backend environment) for the probes."""
    timeout_s = timeout_s * 2 + _START_GRACE_S
    if port is None:
        join_group(adapter, timeout_s)
        return
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))
    join_group(adapter, timeout_s, store=store, rank=rank, world_size=world)


def _spawned_rank(rank: int, world: int, port: int, options: ProbeOptions, results: Any) -> None:
    """Body of one spawned process: join, probe, hand the reports to the parent, leave without hanging."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ok = False
    try:
        adapter = get_adapter(options.device)
        device = adapter.bind(rank)
        _join_group(adapter, rank, world, options.timeout_s, port)
        interconnect, device_report = probe_rank(options, rank, adapter, device)
        results.put((rank, interconnect, device_report, None))
        ok = interconnect.ok
    except Exception as exc:
        results.put((rank, None, None, f"{type(exc).__name__}: {exc}"))
    results.close()
    results.join_thread()
    if ok:
        dist.destroy_process_group()
    else:
        os._exit(1)  # a probe thread may still be blocked in a collective; don't wait for it


def run_spawned(options: ProbeOptions, world: int) -> dict[str, Any]:
    """Spawn ``world`` local ranks, collect their reports (bounded wait), stop them all; the summary."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [
        ctx.Process(target=_spawned_rank, args=(r, world, store.port, options, results), daemon=True)
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    got: dict[int, tuple[Any, Any, str | None]] = {}
    deadline = time.monotonic() + 3 * options.timeout_s + _START_GRACE_S
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, interconnect, device, error = results.get(timeout=0.5)
                got[rank] = (interconnect, device, error)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        _stop(procs)
    errors = {r: "exited without a result" for r in range(world) if r not in got}
    errors.update({r: e for r, (_, _, e) in got.items() if e is not None})
    devices = {r: d for r, (_, d, _) in got.items() if d is not None}
    reports = [got[r][0] for r in sorted(got) if got[r][0] is not None]
    return summarise(options, reports[0] if reports else None, devices, errors)


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(timeout=5)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2)


def run_torchrun(options: ProbeOptions) -> tuple[dict[str, Any] | None, bool]:
    """Join torchrun's group; rank 0 gets the summary. Returns (summary or None, this rank's health)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    adapter = get_adapter(options.device)
    device = adapter.bind(int(os.environ.get("LOCAL_RANK", "0")))
    _join_group(adapter, rank, world, options.timeout_s, None)
    interconnect, device_report = probe_rank(options, rank, adapter, device)
    gathered: list[Any] = [None] * world
    if interconnect.ok:  # after a timeout the group is unusable: report this rank alone
        run_with_deadline(dist.all_gather_object, options.timeout_s, gathered, device_report)
    devices = {r: d for r, d in enumerate(gathered) if isinstance(d, DeviceReport)} or {rank: device_report}
    summary = summarise(options, interconnect, devices, {})
    return (summary if rank == 0 else None), bool(summary["healthy"])
