"""A 2-worker group on a real local Ray with gloo: losing a worker costs nothing but the step in flight."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

SMALL = (
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=20",
    "checkpoint.interval_steps=10",
    "train.log_interval=10",
)


@pytest.fixture
def group_config(make_config: Callable[..., Config]) -> Callable[..., Config]:
    return lambda *extra: make_config("cluster=ray_local", "device=sim_npu", *SMALL, *extra)


def test_killed_worker_is_replaced_and_the_run_matches_an_uninterrupted_one(
    group_config: Callable[..., Config], tmp_path: Path
) -> None:
    clean = group_config()
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED

    faulty = group_config("faults=kill_worker")  # SIGKILL rank 1 just before step 7
    assert run(faulty, run_dir=tmp_path / "faulty") == ExitCode.FINISHED

    events = Journal(tmp_path / "faulty" / "journal.jsonl").read()
    failures = [e for e in events if e["event"] == "failure"]
    recoveries = [e for e in events if e["event"] == "recovered"]
    assert len(failures) == 1 and failures[0]["kind"] == "worker_lost" and failures[0]["ranks"] == [1]
    assert len(recoveries) == 1
    assert recoveries[0]["state_from"] == "peer snapshot from rank 0"
    # Nothing beyond the step in flight is repeated: rank 0 completed step 6, the kill hit step 7.
    assert recoveries[0]["step"] == 6

    a, b = (
        restored_state(clean, tmp_path / "clean" / "checkpoints"),
        restored_state(faulty, tmp_path / "faulty" / "checkpoints"),
    )
    assert int(a["step"]) == int(b["step"]) == 20
    assert mismatched(a, b) == []


def test_two_worker_checkpoint_resumes_on_one_worker_and_back(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    # SGD, not Adam: Adam divides by the root of tiny second moments, which turns the rounding difference
    # between a 2-way and a 1-way gradient average into full-size steps on near-zero gradients.
    sgd = ("optim=sgd", "optim.lr=0.05")
    single = make_config("device=sim_npu", *SMALL, *sgd)

    def group_config(*extra: str) -> Config:
        return make_config("cluster=ray_local", "device=sim_npu", *SMALL, *sgd, *extra)

    assert run(single, run_dir=tmp_path / "single") == ExitCode.FINISHED

    # 2 workers to step 10, then 1 worker (in-process) to step 20.
    assert run(group_config("train.steps=10"), run_dir=tmp_path / "mixed") == ExitCode.FINISHED
    assert run(single, run_dir=tmp_path / "mixed") == ExitCode.FINISHED
    # 1 worker to step 10, then 2 workers to step 20.
    assert run(make_config("device=sim_npu", *SMALL, *sgd, "train.steps=10"), run_dir=tmp_path / "back") == 0
    assert run(group_config(), run_dir=tmp_path / "back") == ExitCode.FINISHED

    reference = restored_state(single, tmp_path / "single" / "checkpoints")
    for name in ("mixed", "back"):
        state = restored_state(single, tmp_path / name / "checkpoints")
        assert int(state["step"]) == 20
        for key in reference:
            # Same samples in the same order; DDP's averaged gradients differ only by rounding.
            torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    finished = {
        name: [e for e in Journal(tmp_path / name / "journal.jsonl").read() if e["event"] == "run_finished"][
            -1
        ]
        for name in ("single", "mixed", "back")
    }
    for name in ("mixed", "back"):
        assert finished[name]["eval_loss"] == pytest.approx(finished["single"]["eval_loss"], rel=1e-4)
    resumed = [e for e in Journal(tmp_path / "back" / "journal.jsonl").read() if e["event"] == "resumed"]
    assert resumed and resumed[-1]["step"] == 10
