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
from trainer.journal import Journal
from trainer.testing.configs import make_config
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


def _events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] == name]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final state of the same 4-worker run without faults."""
    run_dir = tmp_path_factory.mktemp("clean")
    assert run(_config(), run_dir=run_dir) == ExitCode.FINISHED
    [short] = _events(run_dir, "spares_short")
    assert "cluster.spares=1 but 0 fit beside 4 workers" in short["reason"] and "sim_npu" in short["reason"]
    return restored_state(_config(), run_dir / "checkpoints")


def _finished_like(config: Config, run_dir: Path, uninterrupted: dict[str, Any]) -> None:
    assert _events(run_dir, "run_finished")[-1]["step"] == 15
    assert mismatched(uninterrupted, restored_state(config, run_dir / "checkpoints")) == []


def _released(run_dir: Path) -> None:
    """No survivor was taken for hung or left blocked in its collective."""
    assert _events(run_dir, "hang_detected") == []
    assert _events(run_dir, "ranks_not_released") == []


def test_one_rank_killed_out_of_four_is_the_only_one_replaced(
    uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    killed = _config("faults.kill_rank=1", "faults.kill_at_step=7")
    assert run(killed, run_dir=tmp_path) == ExitCode.FINISHED
    [failure] = _events(tmp_path, "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    _released(tmp_path)
    [recovered] = _events(tmp_path, "recovered")
    assert recovered["replaced_ranks"] == [1] and recovered["step"] == 6
    assert recovered["state_from"].startswith("peer snapshot from rank ")
    _finished_like(killed, tmp_path, uninterrupted)
