"""Soak (``slow``, not in the default run: ``scripts/test.sh --slow``): many worker losses at random steps
over a long CPU run; the final state must equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from trainer.cluster.controller import Controller
from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.state import mismatched, restored_state

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

SOAK = (
    "cluster=ray_local",
    "device=sim_npu",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=1500",
    "train.log_interval=100000",
    "checkpoint.interval_steps=250",
    "cluster.chunk_steps=10",
    "cluster.max_restarts=100",
    "fault_tolerance.max_failures_per_family=100",
    "probes.preflight=false",
    "monitoring=off",
)


def test_many_worker_losses_end_in_the_uninterrupted_state(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(*SOAK)
    assert run(config, run_dir=tmp_path / "clean") == ExitCode.FINISHED

    journal = Journal(tmp_path / "soak" / "journal.jsonl")
    ctl = Controller(config, tmp_path / "soak", tmp_path / "soak" / "checkpoints", journal, "127.0.0.1")
    runner = threading.Thread(target=ctl.run, daemon=True)
    runner.start()
    rng, kills = random.Random(7), 0
    while runner.is_alive():
        runner.join(timeout=rng.uniform(1.0, 4.0))
        group = ctl.group
        if runner.is_alive() and group is not None and ctl.state.value == "running":
            try:
                pid = ray.get(group.members[rng.randrange(len(group.members))].info.remote(), timeout=5)[
                    "pid"
                ]
            except (ray.exceptions.RayError, TimeoutError):
                continue
            os.kill(int(pid), signal.SIGKILL)
            kills += 1
    assert ctl.state.value == "finished"

    events = journal.read()
    recoveries = [e for e in events if e["event"] == "recovered"]
    goodput = [e for e in events if e["event"] == "goodput"][-1]
    lost_steps = sum(1 for e in events if e["event"] == "failure")  # at most the step in flight each
    print(
        f"\nsoak: {kills} faults injected, {len(recoveries)} recoveries, <= {lost_steps} steps redone, "
        f"goodput {goodput['ratio']:.1%}"
    )
    assert kills >= 5 and len(recoveries) >= 5
    expected = restored_state(config, tmp_path / "clean" / "checkpoints")
    assert mismatched(expected, restored_state(config, tmp_path / "soak" / "checkpoints")) == []
