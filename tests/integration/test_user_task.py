"""A user's task (``trainer.testing.tasks.ClusterTask``: tuple batches, dict outputs, a scheduler, a manual
step keeping an EMA and a counter) under the survival machinery on a 3-worker Ray group: a worker killed
mid-run is replaced from a peer snapshot, and the final state — model, optimizer, scheduler and the task's
extra state — is bit for bit the uninterrupted run's, across several epochs of the shuffled dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.checkpoint import CheckpointStore
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.configs import THREE_WORKERS, make_config
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

THREE = (
    *THREE_WORKERS,
    "+task._target_=trainer.testing.tasks.ClusterTask",
    "train.global_batch_size=12",  # 8 steps an epoch of the 96-point dataset
    "train.steps=20",
    "checkpoint.interval_steps=10",
    "cluster.chunk_steps=5",
    "probes.preflight=false",
    "monitoring=off",
)


def test_user_task_survives_a_killed_worker_bit_for_bit_with_checkpoints_on_s3(
    tmp_path: Path, s3_run: tuple[str, dict[str, str], str]
) -> None:
    """The killed run's checkpoints go to the S3 server (each actor reaches it with the run's storage
    options); the uninterrupted one's to a local directory."""
    url, options, _ = s3_run
    clean = make_config(*THREE)
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    on_s3 = (f"checkpoint.dir={url}", *(f"+checkpoint.storage_options.{k}={v}" for k, v in options.items()))
    killed = make_config(*THREE, *on_s3, "faults.kill_rank=1", "faults.kill_at_step=12")
    assert run(killed, run_dir=tmp_path / "killed") == ExitCode.FINISHED

    [recovered] = [
        e for e in Journal(tmp_path / "killed" / "journal.jsonl").read() if e["event"] == "recovered"
    ]
    assert recovered["replaced_ranks"] == [1] and recovered["state_from"].startswith("peer snapshot")
    a = restored_state(clean, tmp_path / "clean" / "checkpoints")
    assert [
        e["path"]
        for e in Journal(tmp_path / "killed" / "journal.jsonl").read()
        if e["event"] == "checkpoint_saved"
    ] == [
        f"{url}/step_000000010",
        f"{url}/step_000000020",
    ]
    b = restored_state(killed, url)
    assert mismatched(a, b) == []
    assert bytes(b["extra/steps_seen"].tolist()) == b"20"


def test_a_bug_in_the_users_code_stops_the_group_without_retry_or_hand_over(tmp_path: Path) -> None:
    config = make_config(
        *THREE, "+task.fail_at=12", "+task.fail_rank=1", "fault_tolerance.fallback_chain=[sim_cuda]"
    )
    assert run(config, run_dir=tmp_path) == ExitCode.USER_ERROR
    journal = Journal(tmp_path / "journal.jsonl").read()
    [error] = [e for e in journal if e["event"] == "user_error"]
    assert "Task.train_step raised KeyError: 'label' (step 12, rank 1)" in error["error"]
    assert "Traceback" in error["error"]
    names = {e["event"] for e in journal}
    assert not names & {"failure", "decision", "recovered", "handover_started", "run_finished"}
    store = CheckpointStore(tmp_path / "checkpoints")
    [newest] = store.committed()[-1:]
    store.verify(newest)
    assert newest.name == "step_000000010"
