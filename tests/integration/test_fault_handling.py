"""Faults injected into real 2-worker runs on a local Ray: each detected, decided on and survived."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainer.checkpoint.manifest import checksum_files
from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
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
)


def _events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] == name]


@pytest.fixture
def small(make_config: Callable[..., Config]) -> Callable[..., Config]:
    return lambda *extra: make_config(*SMALL, *extra)


def test_hung_rank_is_detected_by_progress_and_replaced(small: Callable[..., Config], tmp_path: Path) -> None:
    clean = small()
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    hung = small("faults.hang_rank=1", "faults.hang_at_step=7", "fault_tolerance.hang_floor_s=2")
    assert run(hung, run_dir=tmp_path / "hung") == ExitCode.FINISHED

    detected = _events(tmp_path / "hung", "hang_detected")
    assert len(detected) == 1 and detected[0]["ranks"] == [1]
    # Found by its missing progress, well before the collective timeout would have fired.
    assert detected[0]["silent_s"] < hung.cluster.deadline_floor_s
    [recovered] = _events(tmp_path / "hung", "recovered")
    assert recovered["replaced_ranks"] == [1] and recovered["state_from"] == "peer snapshot from rank 0"
    assert recovered["step"] == 6
    a = restored_state(clean, tmp_path / "clean" / "checkpoints")
    assert mismatched(a, restored_state(clean, tmp_path / "hung" / "checkpoints")) == []


def test_straggler_is_flagged_then_excluded(small: Callable[..., Config], tmp_path: Path) -> None:
    config = small(
        "+faults.families={sim_npu: {straggler_rank: 1, straggler_delay_s: 0.1}}",
        "fault_tolerance.straggler_strikes=2",
    )
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FINISHED
    flagged = _events(tmp_path / "run", "straggler_flagged")
    assert [f["rank"] for f in flagged][:2] == [1, 1]
    assert flagged[0]["compute_s"] > config.fault_tolerance.straggler_factor * flagged[0]["median_s"]
    decisions = [d for d in _events(tmp_path / "run", "decision") if d["action"] == "exclude"]
    assert decisions and decisions[0]["ranks"] == [1]
    [recovered] = _events(tmp_path / "run", "recovered")
    assert recovered["action"] == "exclude" and recovered["replaced_ranks"] == [1]


def test_wrong_computing_device_is_caught_before_training(
    small: Callable[..., Config], tmp_path: Path
) -> None:
    config = small("probes.preflight=true", "+faults.families={sim_npu: {wrong_compute_rank: 1}}")
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FINISHED
    [first_probe, *_] = _events(tmp_path / "run", "probe")
    assert first_probe["phase"] == "preflight" and first_probe["wrong_compute_ranks"] == [1]
    decision = _events(tmp_path / "run", "decision")[0]
    assert decision["action"] == "exclude" and decision["ranks"] == [1]
    # Nothing was trained before the device was replaced.
    assert decision["step"] == 0 and _events(tmp_path / "run", "heartbeat")[0]["first_step"] == 1


def test_unavailable_family_at_start_falls_back_to_the_next(
    small: Callable[..., Config], tmp_path: Path
) -> None:
    config = small(
        "+faults.families={sim_npu: {unavailable: true}}", "fault_tolerance.fallback_chain=[sim_cuda]"
    )
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FINISHED
    [failure] = _events(tmp_path / "run", "failure")
    assert failure["kind"] == "family_unavailable" and failure["family"] == "sim_npu"
    [decision] = _events(tmp_path / "run", "decision")
    assert decision["action"] == "fallback" and decision["family"] == "sim_cuda"
    [finished] = _events(tmp_path / "run", "run_finished")
    assert finished["family"] == "sim_cuda" and finished["families"] == ["sim_cuda"]


def test_every_family_failing_aborts_and_keeps_the_last_checkpoint(
    small: Callable[..., Config], make_config: Callable[..., Config], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = make_config(
        "device=sim_npu",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.seq_len=16",
        "train.global_batch_size=8",
        "train.steps=10",
    )
    assert run(first, run_dir=run_dir) == ExitCode.FINISHED
    before = checksum_files(run_dir / "checkpoints")

    doomed = small(
        "+faults.families={sim_npu: {unavailable: true}, sim_cuda: {unavailable: true}}",
        "fault_tolerance.fallback_chain=[sim_cuda]",
    )
    assert run(doomed, run_dir=run_dir) == ExitCode.ABORTED
    [aborted] = _events(run_dir, "run_aborted")
    assert "no family left to fall back to" in aborted["reason"]
    assert "sim_cuda" in aborted["reason"] and "sim_npu" in aborted["reason"]
    assert checksum_files(run_dir / "checkpoints") == before
    assert restored_state(first, run_dir / "checkpoints")  # still restorable


def test_rank_stuck_inside_a_collective_is_caught_by_the_chunk_deadline(
    small: Callable[..., Config], tmp_path: Path
) -> None:
    """Every rank waits in the all-reduce, so progress names no culprit: the chunk's deadline (a multiple of
    the measured step time, floored at cluster.deadline_floor_s) replaces the whole group from disk."""
    base = ("checkpoint.interval_steps=5", "cluster.deadline_floor_s=4")
    clean = small(*base)
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    stuck = small(*base, "faults.hang_rank=1", "faults.hang_at_step=7", "faults.hang_phase=collective")
    assert run(stuck, run_dir=tmp_path / "stuck") == ExitCode.FINISHED

    [detected] = _events(tmp_path / "stuck", "hang_detected")
    assert detected["ranks"] == [0, 1]
    [recovered] = _events(tmp_path / "stuck", "recovered")
    assert recovered["state_from"] == "disk checkpoint" and recovered["step"] == 5
    a = restored_state(clean, tmp_path / "clean" / "checkpoints")
    assert mismatched(a, restored_state(clean, tmp_path / "stuck" / "checkpoints")) == []
