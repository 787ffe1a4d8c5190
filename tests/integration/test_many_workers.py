"""Recovery with more than two workers, where a survivor need not be the lost rank's neighbour: only the
lost (or hung) ranks are replaced; the others are released from their collective and keep their processes.

The session's local Ray advertises 4 sim_npu slots, so 4 workers leave no room for a warm spare: every
replacement is a cold start in the bundle of the worker it replaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import make_config
from trainer.testing.runs import events
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

FOUR = (
    "cluster=ray_local",
    "device=sim_npu",
    "cluster.workers=4",
    "cluster.cpus_per_worker=0.25",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=15",
    "checkpoint.interval_steps=10",
    "cluster.chunk_steps=5",
    "probes.preflight=false",
    "monitoring=off",
)


def _config(*extra: str) -> Config:
    return make_config(*FOUR, *extra)


def _die_in(call: str, slot: int) -> str:
    return f"+faults.families={{sim_npu: {{die_in_call: {call}, die_in_call_slot: {slot}}}}}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final state of the same 4-worker run without faults."""
    run_dir = tmp_path_factory.mktemp("clean")
    assert run(_config(), run_dir=run_dir) == ExitCode.FINISHED
    [short] = events(run_dir, "spares_short")
    assert "cluster.spares=1 but 0 fit beside 4 workers" in short["reason"] and "sim_npu" in short["reason"]
    return restored_state(_config(), run_dir / "checkpoints")


def _finished_like(config: Config, run_dir: Path, uninterrupted: dict[str, Any]) -> None:
    assert events(run_dir, "run_finished")[-1]["step"] == 15
    assert mismatched(uninterrupted, restored_state(config, run_dir / "checkpoints")) == []


def _released(run_dir: Path) -> None:
    """No survivor was taken for hung or left blocked in its collective."""
    assert events(run_dir, "hang_detected") == []
    assert events(run_dir, "ranks_not_released") == []


def test_one_rank_killed_out_of_four_is_the_only_one_replaced(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    # Read ahead on (off by default on the CPU): batches prepared for a position the recovery left are
    # dropped, and the run still ends bit for bit as the uninterrupted one that read none ahead.
    killed = _config("faults.kill_rank=1", "faults.kill_at_step=7", "train.prefetch=true")
    assert run(killed, run_dir=tmp_path) == ExitCode.FINISHED
    [failure] = events(tmp_path, "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    _released(tmp_path)
    [recovered] = events(tmp_path, "recovered")
    assert recovered["replaced_ranks"] == [1] and recovered["step"] == 6
    assert recovered["state_from"].startswith("peer snapshot from rank ")
    assert recovered["loaded_ranks"] == [1]  # the survivors kept their own state of step 6
    _finished_like(killed, tmp_path, uninterrupted)


def test_one_fsdp_rank_killed_out_of_four_is_the_only_one_replaced(tmp_path: Path) -> None:
    """Sharded (FSDP): torch holds a dropped group, so a survivor's connections stay open, and rank 3 — which
    waits on rank 2, not on the lost rank 1 — is released only because the ranks still training are asked to
    shut theirs down (``WorkerActor.release``); without it, it was killed when the release window ran out
    and replaced as well. Every rank goes on from its own copy of its shards of step 5 (the chunk end
    before the kill)."""
    killed = _config("train.parallelism=fsdp", "faults.kill_rank=1", "faults.kill_at_step=7")
    assert run(killed, run_dir=tmp_path) == ExitCode.FINISHED
    [failure] = events(tmp_path, "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    _released(tmp_path)
    [recovered] = events(tmp_path, "recovered")
    assert recovered["replaced_ranks"] == [1] and recovered["step"] == 5
    assert recovered["state_from"] == "shard copies at step 5" and recovered["loaded_ranks"] == [0, 1, 2, 3]
    assert events(tmp_path, "run_finished")[-1]["step"] == 15


@pytest.mark.slow  # 60-95 s here: cold starts of 4-worker groups on 2 cores
def test_two_ranks_killed_at_once_are_both_replaced_from_a_peer_snapshot(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    killed = _config("faults.kill_ranks=[1,2]", "faults.kill_at_step=7")
    assert run(killed, run_dir=tmp_path) == ExitCode.FINISHED
    failures = events(tmp_path, "failure")
    assert [(f["kind"], f["ranks"]) for f in failures] == [("worker_lost", [1, 2])]
    _released(tmp_path)
    [recovered] = events(tmp_path, "recovered")
    assert recovered["replaced_ranks"] == [1, 2] and recovered["step"] == 6
    assert recovered["state_from"] in ("peer snapshot from rank 0", "peer snapshot from rank 3")
    _finished_like(killed, tmp_path, uninterrupted)


@pytest.mark.slow  # 60-95 s here: cold starts of 4-worker groups on 2 cores
def test_replacement_lost_while_loading_the_snapshot_is_replaced_in_turn(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    """Rank 1 is killed at step 7; the actor started to take its rank (slot 4: the first refill) dies while
    loading the survivors' snapshot: the next one takes the rank, from the state the survivors still hold —
    no rebuild, no survivor replaced."""
    config = _config("faults.kill_rank=1", "faults.kill_at_step=7", _die_in("load_snapshot", 4))
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    [failure] = events(tmp_path, "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    assert events(tmp_path, "group_rebuild") == []
    [again] = events(tmp_path, "lost_during_repair")
    assert again["ranks"] == [1]
    [recovered] = events(tmp_path, "recovered")
    assert recovered["action"] == "replace_worker" and recovered["replaced_ranks"] == [1]
    assert recovered["step"] == 6 and recovered["state_from"].startswith("peer snapshot from rank ")
    _finished_like(config, tmp_path, uninterrupted)


@pytest.mark.slow  # 60-95 s here: cold starts of 4-worker groups on 2 cores
def test_rank_hung_in_compute_out_of_four_is_the_only_one_replaced(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    hung = _config("faults.hang_rank=2", "faults.hang_at_step=7", "fault_tolerance.hang_floor_s=2")
    assert run(hung, run_dir=tmp_path) == ExitCode.FINISHED
    [detected] = events(tmp_path, "hang_detected")
    assert detected["ranks"] == [2]  # the peers waiting for it in the all-reduce are not
    assert events(tmp_path, "ranks_not_released") == []
    [recovered] = events(tmp_path, "recovered")
    assert recovered["replaced_ranks"] == [2] and recovered["step"] == 6
    assert recovered["state_from"].startswith("peer snapshot from rank ")
    _finished_like(hung, tmp_path, uninterrupted)


@pytest.mark.slow  # two 8-worker runs on 2 cores: about 3-6 min here
def test_one_rank_killed_out_of_eight_is_the_only_one_replaced(tmp_path: Path) -> None:
    """Eight workers of the CPU family (a fifth of a CPU each, one warm spare), so that they fit the session's
    Ray; they live on one node, so the driver reaches them through that node's relay."""
    mine = ("device", "cluster.workers", "cluster.cpus_per_worker", "train.global_batch_size", "cluster=")
    eight = (
        *(o for o in FOUR if not o.startswith(mine)),
        "device=cpu",
        "cluster.workers=8",
        "cluster.spares=1",
        "cluster.cpus_per_worker=0.2",
        "train.global_batch_size=16",
    )
    clean = make_config("cluster=ray_local", *eight)
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    killed = make_config("cluster=ray_local", *eight, "faults.kill_rank=5", "faults.kill_at_step=7")
    assert run(killed, run_dir=tmp_path / "killed") == ExitCode.FINISHED
    [failure] = events(tmp_path / "killed", "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [5]
    _released(tmp_path / "killed")
    [recovered] = events(tmp_path / "killed", "recovered")
    assert recovered["replaced_ranks"] == [5] and recovered["loaded_ranks"] == [5]
    uninterrupted = restored_state(clean, tmp_path / "clean" / "checkpoints")
    _finished_like(killed, tmp_path / "killed", uninterrupted)
