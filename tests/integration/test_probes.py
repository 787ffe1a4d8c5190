"""The probes on real gloo process groups of 2-3 spawned processes (TCPStore on 127.0.0.1, port 0).

Each rank runs a module-level function of this file and sends back its reports; the parent judges them.
Every child is stopped at the end of its test, whatever happened.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.devices import get_adapter
from trainer.faults import CollectiveFaults
from trainer.health import InterconnectReport, assess, probe_device, probe_interconnect

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SIZES = (4096, 1 << 18, 1 << 20)


# --- harness ---------------------------------------------------------------------------------------------
def _rank_main(
    rank: int, world: int, port: int, target: Callable[..., Any], args: tuple[Any, ...], out: Any
) -> None:
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30)
        )
        out.put((rank, target(rank, *args)))
    except BaseException as exc:
        out.put((rank, f"rank {rank} raised {type(exc).__name__}: {exc}"))
    out.close()
    out.join_thread()
    os._exit(0)  # a probe thread may be blocked in a collective: leave without waiting for it


def run_ranks(
    world: int,
    target: Callable[..., Any],
    *args: Any,
    expect: tuple[int, ...] | None = None,
    timeout_s: float = 45,
) -> dict[int, Any]:
    """``target(rank, *args)`` on each of ``world`` gloo ranks; the values of the ranks in ``expect``."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, store.port, target, args, out), daemon=True)
        for r in range(world)
    ]
    expected = set(range(world) if expect is None else expect)
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.start()
        while not expected <= got.keys() and time.monotonic() < deadline:
            try:
                rank, value = out.get(timeout=0.5)
            except queue.Empty:
                continue
            assert not isinstance(value, str), value
            got[rank] = value
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    assert expected <= got.keys(), f"ranks {sorted(expected - got.keys())} sent nothing within {timeout_s} s"
    return got


# --- what the ranks run ----------------------------------------------------------------------------------
def _probe(rank: int, **faults: Any) -> InterconnectReport:
    profile = CollectiveFaults(rank=rank, **faults) if faults else None
    return probe_interconnect(CPU, sizes_bytes=SIZES, iters=3, faults=profile, timeout_s=15)


def _healthy_then_slow_rank_1(rank: int) -> tuple[InterconnectReport, InterconnectReport]:
    return _probe(rank), _probe(rank, slow_ranks=(1,), slow_rank_delay_s=0.05)


def _failing_then_healthy(rank: int) -> tuple[InterconnectReport, InterconnectReport]:
    return _probe(rank, error_rate=1.0), _probe(rank)


def _rank_1_never_probes(rank: int) -> InterconnectReport:
    if rank == 1:
        time.sleep(120)  # alive but stuck: the kind of peer only a deadline notices
    return probe_interconnect(CPU, sizes_bytes=SIZES, iters=3, timeout_s=2.0)


# --- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_probe_figures_are_sane_and_agreed(world: int) -> None:
    reports = run_ranks(world, _probe)
    report = reports[0]
    assert report.ok, report.error
    assert (report.world_size, report.backend, report.timed_out) == (world, "gloo", False)
    assert [p.bytes for p in report.points] == list(SIZES)
    for point in report.points:
        assert point.seconds > 0
        assert point.busbw_bytes_per_s > 0
        assert point.algbw_bytes_per_s == point.bytes / point.seconds
        assert point.busbw_bytes_per_s == point.algbw_bytes_per_s * 2 * (world - 1) / world
    assert report.small_message_latency_s == report.points[0].seconds > 0
    assert len(report.links) == (1 if world == 2 else world)
    assert all(link.bandwidth_bytes_per_s > 0 for link in report.links)
    assert report.slowest_link in report.links
    # Every rank reports the same figures: the slowest rank's time per size, each link timed once.
    for other in reports.values():
        assert (other.points, other.links) == (report.points, report.links)
    json.dumps(report.to_dict())


def test_slow_rank_is_named_and_degrades_the_assessment() -> None:
    healthy, slow = run_ranks(3, _healthy_then_slow_rank_1)[0]
    assert healthy.ok and slow.ok, (healthy.error, slow.error)
    assert slow.slow_rank == 1
    assert slow.slowest_link is not None and 1 in (slow.slowest_link.src, slow.slowest_link.dst)
    # The healthy probe's figure is the baseline (not asserted healthy itself: 3 ranks share 2 cores here).
    verdict = assess(slow, healthy.busbw_bytes_per_s)
    assert verdict.degraded and not verdict.healthy
    assert f"link {slow.slowest_link.name}" in verdict.reason
    assert "slow rank 1" in verdict.reason


def test_injected_errors_fail_the_probe_on_every_rank_without_raising() -> None:
    reports = run_ranks(2, _failing_then_healthy)
    for rank, (failed, after) in reports.items():
        assert (failed.ok, failed.timed_out) == (False, False)
        assert "InjectedCollectiveError" in (failed.error or ""), failed.error
        assert f"rank {rank}" in (failed.error or "")
        # All ranks gave up at the same phase, so the group is still in step for the next probe.
        assert after.ok, after.error
    assert not assess(reports[0][0], None).healthy


def test_a_rank_that_never_joins_times_the_probe_out() -> None:
    started = time.monotonic()
    report = run_ranks(2, _rank_1_never_probes, expect=(0,))[0]
    assert report.timed_out is True
    assert report.ok is False
    assert "stalled in all_reduce of 4096 bytes" in (report.error or "")
    assert report.duration_s < 10  # the 2 s deadline, not gloo's 30 s timeout
    assert time.monotonic() - started < 30
    assert assess(report, None).degraded


@pytest.mark.parametrize("family", ["cpu", "sim_npu"])
def test_device_probe_catches_wrong_compute(family: str) -> None:
    adapter = get_adapter(family)
    device = adapter.bind(0)
    good = probe_device(adapter, device)
    assert good.ok and not good.wrong_result and not good.timed_out, good.error
    assert good.max_abs_error is not None and good.tolerance is not None
    assert good.max_abs_error <= good.tolerance
    assert good.matmul_s is not None and good.matmul_s > 0
    assert good.memory["probe_bytes"] > 0 and "total" in good.memory
    bad = probe_device(adapter, device, faults_wrong_compute=True)
    assert bad.wrong_result is True and bad.ok is False
    assert json.loads(json.dumps(bad.to_dict()))["wrong_result"] is True


def test_probe_command_prints_json_and_exits_0() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "trainer.probe", "--world-size", "2", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["healthy"] is True
    points = summary["interconnect"]["points"]
    assert [p["bytes"] for p in points] == [4096, 1 << 20, 8 << 20]
    assert all(p["busbw_bytes_per_s"] > 0 for p in points)
    assert summary["interconnect"]["busbw_bytes_per_s"] == points[-1]["busbw_bytes_per_s"]
    assert sorted(summary["devices"]) == ["0", "1"]


def test_probe_command_names_the_rank_with_one_flipped_bit() -> None:
    # The lowest mantissa bit of one element on rank 1 of 3: both checks name rank 1 and nobody else.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "trainer.probe", "--world-size", "3", "--sizes", "4K", "--iters", "1"]
    cmd += ["--flip-bit", "1:0", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["healthy"] is False
    assert summary["wrong_compute_ranks"] == [1]
    assert summary["bitwise_disagreeing_ranks"] == [1]
    devices = summary["devices"]
    assert [devices[r]["wrong_result"] for r in ("0", "1", "2")] == [False, True, False]
    assert devices["1"]["wrong_elements"] == 1
    assert devices["0"]["result_digest"] == devices["2"]["result_digest"] != devices["1"]["result_digest"]
