"""One driver per run (``trainer.checkpoint.lease``): a second driver is refused while the first runs; a
lease whose holder stopped renewing it is taken over, and journalled; a driver whose lease was taken over
cannot commit a checkpoint (the fence), and learns it at its next renewal. Real files and real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.checkpoint import CheckpointManager, CheckpointStore
from trainer.checkpoint.lease import LEASE_NAME, Lease, LeaseHeldError, LeaseLostError
from trainer.errors import CheckpointWriteError, ExitCode
from trainer.job import run
from trainer.testing.configs import TINY_CPU, make_config
from trainer.testing.runs import events
from trainer.worker import Worker

TINY = TINY_CPU


def test_a_second_driver_is_refused_while_the_first_runs_untouched(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer",
            *TINY,
            "train.steps=100000",
            "checkpoint.interval_steps=10",
            "train.log_interval=10",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert first.stdout is not None
        for line in first.stdout:  # running: past its first checkpoint
            if line.startswith("step 20/"):
                break
        holder = json.loads((run_dir / "checkpoints" / LEASE_NAME).read_text())
        assert holder["pid"] == first.pid and holder["generation"] == 1
        with pytest.raises(
            LeaseHeldError, match=rf"in use by another driver: pid {first.pid} on .*one driver per run"
        ):
            run(make_config(*TINY, "train.steps=5"), run_dir=run_dir)
        assert first.poll() is None, "the first driver goes on"
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == ExitCode.PREEMPTED
    store = CheckpointStore(run_dir / "checkpoints")
    for path in store.committed():
        assert store.verify(path).lease_generation == 1  # all of them the first driver's
    assert not (run_dir / "checkpoints" / LEASE_NAME).exists(), "released at the end"
    assert [e["event"] for e in events(run_dir, "run_started")] == ["run_started"]


def test_a_stale_lease_is_taken_over_and_journalled(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    dead = {
        "host": "gone-host",
        "pid": 999999,
        "token": "x",
        "generation": 4,
        "started": 0,
        "renewed": time.time() - 60,
    }
    (root / LEASE_NAME).write_text(json.dumps(dead))
    assert run(make_config(*TINY, "train.steps=3"), run_dir=tmp_path) == ExitCode.FINISHED
    [taken] = events(tmp_path, "lease_taken_over")
    assert taken["generation"] == 5 and taken["previous"]["host"] == "gone-host"
    store = CheckpointStore(root)
    [newest] = store.committed()
    assert store.verify(newest).lease_generation == 5


def test_a_driver_whose_lease_was_taken_over_cannot_commit(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    paused = Lease(root, stale_after_s=30, renew_s=0.5).acquire()
    paused_fence = paused.fence
    # As if it had been paused past the staleness: the other driver judges it stale and takes over.
    newer = Lease(root, stale_after_s=0.1, renew_s=0.1)
    time.sleep(0.2)
    newer.acquire()
    try:
        assert newer.generation == 2 and newer.taken_from is not None
        assert newer.taken_from["pid"] == os.getpid()
        with pytest.raises(LeaseLostError, match="was taken over"):
            paused_fence.check()
        assert paused.lost.wait(5.0), "the paused driver learns it at its next renewal"

        config = make_config(*TINY, "train.steps=1")
        worker = Worker(config)
        worker.setup()
        worker.train_step()
        stale = CheckpointManager(root)
        stale.store.fence = paused_fence
        with pytest.raises(CheckpointWriteError, match="taken over"):
            worker.save(stale)
        assert CheckpointStore(root).committed() == [] and not (root / "latest").exists()
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")], "nothing half written is left"

        current = CheckpointManager(root)
        current.store.fence = newer.fence
        path = worker.save(current)
        assert CheckpointStore(root).verify(path).lease_generation == 2
    finally:
        paused.release()  # not its lease any more: leaves it in place
        assert (root / LEASE_NAME).exists()
        newer.release()
    assert not (root / LEASE_NAME).exists()
