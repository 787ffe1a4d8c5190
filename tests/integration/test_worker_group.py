"""Worker groups on a real local Ray with gloo: losing a worker costs nothing but the step in flight, and a
warm spare that dies is replaced in the background."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
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
    # The backend's own timeout follows the collective timeout the group joins with, journalled as it changes.
    timeouts = [e for e in events if e["event"] == "backend_timeouts"]
    assert timeouts and all(t["backend"] == "gloo" for t in timeouts)
    assert all(t["process_group_s"] == t["requested_s"] > 0 for t in timeouts)

    a, b = (
        restored_state(clean, tmp_path / "clean" / "checkpoints"),
        restored_state(faulty, tmp_path / "faulty" / "checkpoints"),
    )
    assert int(a["step"]) == int(b["step"]) == 20
    assert mismatched(a, b) == []


@pytest.mark.slow  # about 35 s; a change of world size stays in the default suite (test_handover_world_size)
def test_a_three_worker_checkpoint_resumes_on_one_worker_and_back(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A group's run equals one process's: 8 samples per step on 3 ranks (3 + 3 + 2, each rank's loss
    weighted by its share so that the update is the mean over the 8), across a resume on another world size
    in both directions."""
    # SGD, not Adam: Adam divides by the root of tiny second moments, which turns the rounding difference
    # between a 2-way and a 1-way gradient average into full-size steps on near-zero gradients.
    sgd = ("optim=sgd", "optim.lr=0.05")
    single = make_config("device=sim_npu", *SMALL, *sgd)

    def group_config(*extra: str) -> Config:
        return make_config("cluster=ray_local", "device=sim_npu", "cluster.workers=3", *SMALL, *sgd, *extra)

    assert run(single, run_dir=tmp_path / "single") == ExitCode.FINISHED

    # The group to step 10, then 1 worker (in-process) to step 20.
    assert run(group_config("train.steps=10"), run_dir=tmp_path / "mixed") == ExitCode.FINISHED
    assert run(single, run_dir=tmp_path / "mixed") == ExitCode.FINISHED
    # 1 worker to step 10, then the group to step 20.
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


def test_a_warm_spare_that_dies_is_replaced_in_the_background_and_then_used(tmp_path: Path) -> None:
    """The spare is SIGKILLed early in the run; its bundle gets a new actor in the background, which later
    takes the rank of a killed worker without a cold start. The driver is a process of its own, attached to
    the session's Ray; every collective is slowed so the run lasts long enough to watch."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "trainer",
        "cluster=ray_local",
        f"cluster.address={ray.get_runtime_context().gcs_address}",
        "device=sim_npu",
        "cluster.workers=3",
        "cluster.spares=1",
        "cluster.cpus_per_worker=0.25",
        *SMALL,
        "train.global_batch_size=6",
        "train.steps=90",
        "checkpoint.interval_steps=0",
        "cluster.chunk_steps=5",
        "probes.preflight=false",
        "probes.interval_steps=0",
        "+faults.families={sim_npu: {collective_delay_s: 0.1}}",
        "faults.kill_rank=1",
        "faults.kill_at_step=80",
        "monitoring=off",
        f"hydra.run.dir={run_dir}",
    ]
    driver = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def journal() -> list[dict[str, object]]:
        path = run_dir / "journal.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    try:
        deadline = time.monotonic() + 180
        while not [e for e in journal() if e["event"] == "group_started"]:
            assert driver.poll() is None and time.monotonic() < deadline, "the group never started"
            time.sleep(0.2)
        [started] = [e for e in journal() if e["event"] == "group_started"]
        [spare] = started["spares"]  # type: ignore[misc]
        os.kill(int(spare["pid"]), signal.SIGKILL)
        out, _ = driver.communicate(timeout=240)
    finally:
        driver.kill()
    assert driver.returncode == ExitCode.FINISHED, out[-3000:]
    names = [e["event"] for e in journal()]
    assert "spare_replaced" in names and names.index("spare_replaced") < names.index("failure")
    # The new actor in the dead spare's bundle was journalled once it was up, before it took the rank.
    ready = [e for e in journal() if e["event"] == "spare_ready"]
    assert ready and names.index("spare_replaced") < names.index("spare_ready") < names.index("recovered")
    first_up: list[dict[str, object]] = [*started["members"], *started["spares"]]  # type: ignore[misc]
    assert ready[0]["pid"] not in {p["pid"] for p in first_up}
    [recovered] = [e for e in journal() if e["event"] == "recovered"]
    assert recovered["replaced_ranks"] == [1] and recovered["state_from"] == "peer snapshot from rank 0"
    [finished] = [e for e in journal() if e["event"] == "run_finished"]
    assert finished["step"] == 90
