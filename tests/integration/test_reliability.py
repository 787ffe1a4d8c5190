"""Rows of the fault matrix not covered elsewhere: each fault injected into a real run, outcome asserted."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainer.checkpoint import CheckpointStore
from trainer.config import Config
from trainer.errors import ConfigError, ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.state import mismatched, restored_state

SMALL = (
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "monitoring=off",
)
GROUP = ("cluster=ray_local", "device=sim_npu", "cluster.chunk_steps=5", "probes.preflight=false", *SMALL)


def _events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] == name]


@pytest.mark.usefixtures("local_ray")
def test_worker_killed_while_writing_a_checkpoint(make_config: Callable[..., Config], tmp_path: Path) -> None:
    clean = make_config(*GROUP, "train.steps=20", "checkpoint.interval_steps=10")
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    faulty = make_config(
        *GROUP, "train.steps=20", "checkpoint.interval_steps=10", "faults.kill_during_checkpoint_step=10"
    )
    assert run(faulty, run_dir=tmp_path / "faulty") == ExitCode.FINISHED

    [failure] = _events(tmp_path / "faulty", "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [0]
    [recovered] = _events(tmp_path / "faulty", "recovered")
    assert recovered["state_from"] == "peer snapshot from rank 1"
    store = CheckpointStore(tmp_path / "faulty" / "checkpoints")
    for path in store.committed():  # every committed checkpoint is whole
        store.verify(path)
    assert [p.name for p in store.committed()][-1] == "step_000000020"
    assert (
        mismatched(
            restored_state(clean, tmp_path / "clean" / "checkpoints"), restored_state(clean, store.root)
        )
        == []
    )


def test_corrupted_newest_checkpoint_is_skipped_in_a_run(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    base = ("device=cpu", *SMALL, "checkpoint.interval_steps=10")
    assert run(make_config(*base, "train.steps=20"), run_dir=tmp_path / "run") == ExitCode.FINISHED
    damaged = make_config(*base, "train.steps=30", "faults.corrupt_latest_checkpoint=true")
    assert run(damaged, run_dir=tmp_path / "run") == ExitCode.FINISHED

    [injected] = _events(tmp_path / "run", "fault_injected")
    [skipped] = _events(tmp_path / "run", "checkpoint_skipped")
    assert skipped["path"].endswith("step_000000020") and injected["path"] in skipped["reason"]
    [resumed] = _events(tmp_path / "run", "resumed")
    assert resumed["step"] == 10
    reference = make_config(*base, "train.steps=30")
    assert run(reference, run_dir=tmp_path / "reference") == ExitCode.FINISHED
    expected = restored_state(reference, tmp_path / "reference" / "checkpoints")
    assert mismatched(expected, restored_state(reference, tmp_path / "run" / "checkpoints")) == []


def test_disk_full_during_save(make_config: Callable[..., Config], tmp_path: Path, small_disk: Path) -> None:
    config = make_config(
        "device=cpu", *SMALL, "train.steps=30", "checkpoint.interval_steps=10", f"checkpoint.dir={small_disk}"
    )
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FAILED

    failed = _events(tmp_path / "run", "checkpoint_failed")
    assert failed, "no save failed: the disk was not small enough"
    assert "No space left on device" in failed[0]["error"]
    assert "the previous checkpoint (step_000000010) is intact" in failed[0]["error"]
    assert _events(tmp_path / "run", "run_failed")[0]["step"] == 30  # training went on to the end
    store = CheckpointStore(small_disk)
    assert [p.name for p in store.committed()] == ["step_000000010"]
    assert store.verify(store.committed()[0]).step == 10
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.usefixtures("local_ray")
def test_world_size_over_the_cluster_is_refused_before_launch(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(*GROUP, "cluster.workers=8", "train.global_batch_size=16")
    with pytest.raises(
        ConfigError, match=r"cluster\.workers=8 does not fit the Ray cluster.*allowed: 1\.\.4"
    ):
        run(config, run_dir=tmp_path / "run")
    assert not _events(tmp_path / "run", "group_started")


@pytest.mark.usefixtures("local_ray")
def test_family_without_resources_aborts_with_a_clear_reason(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(*GROUP, "device=cuda", "train.steps=10")
    assert run(config, run_dir=tmp_path / "run") == ExitCode.ABORTED
    [aborted] = _events(tmp_path / "run", "run_aborted")
    assert "cuda is unavailable" in aborted["reason"] and "no family left" in aborted["reason"]


def test_unreachable_cluster_fails_within_the_connect_timeout(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            *GROUP,
            f"cluster.address=127.0.0.1:{port}",
            "cluster.connect_timeout_s=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == ExitCode.FAILED
    assert f"cluster.address='127.0.0.1:{port}' is unreachable" in result.stderr


@pytest.mark.usefixtures("local_ray")
def test_resources_never_granted_fail_within_the_start_timeout(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    import ray

    @ray.remote(num_cpus=0, resources={"sim_cuda": 4})
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()  # holds every sim_cuda slot of the cluster
    try:
        ray.get(hog.ready.remote(), timeout=60)
        config = make_config(*GROUP, "device=sim_cuda", "train.steps=10", "cluster.start_timeout_s=3")
        assert run(config, run_dir=tmp_path / "run") == ExitCode.ABORTED
    finally:
        ray.kill(hog)
    [aborted] = _events(tmp_path / "run", "run_aborted")
    assert "did not grant" in aborted["reason"] and "cluster.start_timeout_s=3.0" in aborted["reason"]
