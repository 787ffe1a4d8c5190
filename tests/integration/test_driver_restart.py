"""The driver is SIGKILLed mid-run; the same command re-run resumes from the newest committed checkpoint.

The re-launched drivers join the session's Ray through its address (``cluster.address``), which also
covers running against an existing cluster rather than a Ray the job starts itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

OVERRIDES = (
    "cluster=ray_local",
    "device=sim_npu",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=40",
    "checkpoint.interval_steps=10",
    "cluster.chunk_steps=2",
    "monitoring.port=0",
)


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip()[5:14]) if pointer.exists() else -1


def test_driver_killed_and_relaunched_resumes(make_config: Callable[..., Config], tmp_path: Path) -> None:
    reference = make_config(*OVERRIDES)
    assert run(reference, run_dir=tmp_path / "clean") == ExitCode.FINISHED

    address = ray.get_runtime_context().gcs_address
    run_dir = tmp_path / "restarted"
    command = [
        sys.executable,
        "-m",
        "trainer",
        *OVERRIDES,
        f"cluster.address={address}",
        f"hydra.run.dir={run_dir}",
    ]
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while _latest_step(run_dir) < 10 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_after = _latest_step(run_dir)
        assert 10 <= killed_after < 40, "the driver should be killed mid-run, after its first checkpoint"
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(timeout=30)

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == ExitCode.FINISHED, again.stderr[-3000:]
    events = Journal(run_dir / "journal.jsonl").read()
    assert [e["event"] for e in events].count("run_started") == 2
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= killed_after
    assert _latest_step(run_dir) == 40
    # The killed driver's lease was still fresh, but its process is gone from this host: taken over at once.
    [taken] = [e for e in events if e["event"] == "lease_taken_over"]
    assert taken["previous"]["pid"] == driver.pid and taken["generation"] == 2
    # The goodput account spans both drivers and books the gap as restart time.
    final = [e for e in events if e["event"] == "goodput"][-1]
    first_start = next(e["time"] for e in events if e["event"] == "run_started")
    assert final["badput_s"]["restart"] > 0
    assert final["wall_s"] >= 0.9 * (final["time"] - first_start)
    assert final["productive_s"] < final["wall_s"]

    a = restored_state(reference, tmp_path / "clean" / "checkpoints")
    assert mismatched(a, restored_state(reference, run_dir / "checkpoints")) == []
