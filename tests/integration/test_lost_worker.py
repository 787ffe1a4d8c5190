"""A worker lost during any remote call the controller makes is a worker loss, and live state is never
discarded: each run below kills a worker inside one kind of call (``faults.families.<f>.die_in_call``) on a
real local Ray and checks the run recovers (or hands over), from the newest state there is, to the same
final state as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer.checkpoint import CheckpointStore
from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import make_config
from trainer.testing.runs import events
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

SMALL = (
    "cluster=ray_local",
    "device=sim_npu",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=20",
    "checkpoint.interval_steps=10",
    "cluster.chunk_steps=5",
    "probes.preflight=false",
    "monitoring=off",
)


def _config(*extra: str) -> Config:
    return make_config(*SMALL, *extra)


def _die_in(call: str, slot: int, family: str = "sim_npu") -> str:
    return f"+faults.families={{{family}: {{die_in_call: {call}, die_in_call_slot: {slot}}}}}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final state of the same run without faults."""
    run_dir = tmp_path_factory.mktemp("clean")
    assert run(_config(), run_dir=run_dir) == ExitCode.FINISHED
    return restored_state(_config(), run_dir / "checkpoints")


def _finished_like(run_dir: Path, uninterrupted: dict[str, Any]) -> None:
    """Finished at the last step, every committed checkpoint whole, the final state the uninterrupted one."""
    assert events(run_dir, "run_finished")[-1]["step"] == 20
    store = CheckpointStore(run_dir / "checkpoints")
    for path in store.committed():
        store.verify(path)
    assert mismatched(uninterrupted, restored_state(_config(), store.root)) == []


@pytest.mark.parametrize(
    ("call", "slot", "extra"),
    [
        ("save", 0, ()),  # rank 0 stages the checkpoint at step 10
        ("probe", 1, ("probes.preflight=true",)),  # the preflight probe before step 1
        ("evaluate", 0, ()),  # the held-out loss at the end, before the final save
    ],
)
def test_worker_lost_inside_a_call_is_a_worker_loss(
    call: str, slot: int, extra: tuple[str, ...], uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    assert run(_config(_die_in(call, slot), *extra), run_dir=tmp_path) == ExitCode.FINISHED
    [failure] = events(tmp_path, "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [slot]
    [recovered] = events(tmp_path, "recovered")
    assert recovered["replaced_ranks"] == [slot]
    assert recovered["state_from"] == f"peer snapshot from rank {1 - slot}"
    _finished_like(tmp_path, uninterrupted)


def test_worker_lost_while_restoring_at_start_resumes_from_the_survivor(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    assert run(_config("train.steps=10"), run_dir=tmp_path) == ExitCode.FINISHED
    assert run(_config(_die_in("restore", 1)), run_dir=tmp_path) == ExitCode.FINISHED
    [failure] = events(tmp_path, "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    [recovered] = events(tmp_path, "recovered")
    # Rank 0 had restored step 10 from disk: the repair takes it from there, nothing is trained twice.
    assert recovered["step"] == 10 and recovered["state_from"] == "peer snapshot from rank 0"
    _finished_like(tmp_path, uninterrupted)


@pytest.mark.parametrize(
    ("kill_at", "state_from", "step"),
    [(7, "disk checkpoint", 5), (3, "initial state (no checkpoint yet)", 0)],
)
def test_snapshot_source_lost_falls_back_to_the_checkpoint_then_the_initial_state(
    kill_at: int, state_from: str, step: int, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    """Rank 1 is killed; rank 0, the only survivor, dies while giving its snapshot: no live member is left.

    The checkpoint of step 5 comes from an earlier session of the run: one that rank 0 were still writing in
    the background when it died would die with it (never half committed), which is the initial-state case."""
    if step:
        assert (
            run(_config("checkpoint.interval_steps=5", f"train.steps={step}"), run_dir=tmp_path)
            == ExitCode.FINISHED
        )
    config = _config(
        "checkpoint.interval_steps=5",
        "faults.kill_rank=1",
        f"faults.kill_at_step={kill_at}",
        _die_in("snapshot", 0),
    )
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    recovered = events(tmp_path, "recovered")[0]
    assert recovered["state_from"] == state_from and recovered["step"] == step
    assert recovered["state_reason"].startswith("no live member held the state")
    _finished_like(tmp_path, uninterrupted)


def test_a_replacement_lost_while_loading_the_snapshot_is_replaced_in_turn(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    """Rank 1 is killed at step 7; the warm spare taking its rank (slot 2) dies while loading the snapshot:
    a loss during the repair is repaired the same way — the next spare takes the rank, from the state rank 0
    still holds — not by rebuilding the group."""
    config = _config(
        "checkpoint.interval_steps=5",
        "faults.kill_rank=1",
        "faults.kill_at_step=7",
        _die_in("load_snapshot", 2),
    )
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    assert events(tmp_path, "group_rebuild") == []
    [again] = events(tmp_path, "lost_during_repair")
    assert again["ranks"] == [1] and again["error"].startswith("ActorDiedError")
    [recovered] = events(tmp_path, "recovered")
    assert recovered["action"] == "replace_worker" and recovered["replaced_ranks"] == [1]
    assert recovered["state_from"] == "peer snapshot from rank 0" and recovered["step"] == 6
    _finished_like(tmp_path, uninterrupted)


def test_worker_lost_during_a_hand_over_is_repaired_and_the_hand_over_completes(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    """Every in-flight probe on sim_npu reads as degraded (an unreachable baseline), so the run is handed over
    to sim_cuda at step 10; rank 1 of the new group dies while loading the state."""
    config = _config(
        "probes.interval_steps=10",
        "+probes.baseline_busbw.sim_npu=1e15",
        "fault_tolerance.max_degraded_probes=1",
        "fault_tolerance.fallback_chain=[sim_cuda]",
        _die_in("load_snapshot", 1, family="sim_cuda"),
    )
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    [started] = events(tmp_path, "handover_started")
    assert started["step"] == 10 and started["to_family"] == "sim_cuda"
    failures = [(f["kind"], f["family"], f["ranks"]) for f in events(tmp_path, "failure")]
    assert failures == [("degraded_probe", "sim_npu", []), ("worker_lost", "sim_cuda", [1])]
    [recovered] = events(tmp_path, "recovered")
    assert recovered["family"] == "sim_cuda" and recovered["state_from"] == "peer snapshot from rank 0"
    [parity] = events(tmp_path, "parity_check")
    assert parity["passed"] and parity["state_from"] == "peer snapshot from rank 0 on sim_npu"
    [completed] = events(tmp_path, "handover_completed")
    assert completed["step"] == 11 and completed["to_family"] == "sim_cuda"
    _finished_like(tmp_path, uninterrupted)
