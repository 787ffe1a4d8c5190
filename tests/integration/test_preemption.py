"""Preemption of the driver: SIGTERM to ``python -m trainer`` mid-run stops it at the step in flight, commits
that step, journals ``preempted`` and exits with ExitCode.PREEMPTED; the same command re-run resumes there.

Real processes and real signals: the driver runs as a child process (in a session of its own, so that a
signal to its process group reaches nobody else), on one CPU process and on a 3-worker Ray group. Runs are
sized so that they would not end by themselves within the test: only the signal stops them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.checkpoint import CheckpointStore
from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import THREE_WORKERS, make_config
from trainer.testing.runs import events
from trainer.testing.state import mismatched, restored_state

TINY = (
    "model.n_layer=1",
    "model.n_embd=16",
    "model.seq_len=8",
    "train.global_batch_size=6",
    "train.steps=100000",
    "checkpoint.interval_steps=100000",
    "monitoring=off",
)


def _driver(run_dir: Path, *overrides: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "trainer", *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        command,
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(driver: subprocess.Popen[str], text: str, timeout_s: float = 240) -> list[str]:
    """Lines of the driver's output up to the first that contains ``text``."""
    assert driver.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = driver.stdout.readline()
        if not line and driver.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    driver.kill()
    pytest.fail(f"the driver never printed {text!r}:\n{''.join(lines)[-3000:]}")


def _finish(driver: subprocess.Popen[str]) -> str:
    try:
        out, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
    return out


def _resumes_at(run_dir: Path, saved: int, *overrides: str) -> None:
    """The same command, re-run to two steps past ``saved``, resumes at ``saved`` and finishes."""
    command = [sys.executable, "-m", "trainer", *TINY, *overrides, f"train.steps={saved + 2}"]
    again = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == ExitCode.FINISHED, again.stdout[-3000:]
    assert [e["step"] for e in events(run_dir, "resumed")] == [saved]


def _last_step(lines: list[str]) -> int:
    [step] = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")][-1:]
    return step


def _assert_saved(run_dir: Path, at_least: int) -> int:
    [preempted] = events(run_dir, "preempted")
    assert preempted["signal"] == "SIGTERM" and preempted["saved_step"] == preempted["step"] >= at_least
    store = CheckpointStore(run_dir / "checkpoints")
    [newest] = store.committed()[-1:]
    store.verify(newest)
    assert newest.name == f"step_{preempted['saved_step']:09d}"
    return int(preempted["saved_step"])


def test_sigterm_to_the_process_group_of_a_single_process_run_saves_the_step_in_flight(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    driver = _driver(run_dir, "device=cpu", "train.log_interval=5")
    seen = _last_step(_wait_for(driver, "step 20/"))
    os.killpg(driver.pid, signal.SIGTERM)  # as SLURM does (Ctrl-C likewise, with SIGINT): the whole group
    out = _finish(driver)
    assert driver.returncode == ExitCode.PREEMPTED, out[-3000:]
    saved = _assert_saved(run_dir, at_least=seen)

    _resumes_at(run_dir, saved, "device=cpu")


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize(
    "workers_too",
    [False, pytest.param(True, marks=pytest.mark.slow, id="and-every-worker")],
    ids=lambda v: "and-every-worker" if v else "driver-group",
)
def test_sigterm_to_a_ray_driver_stops_every_rank_at_the_step_in_flight_and_saves_it(
    workers_too: bool, tmp_path: Path
) -> None:
    """The driver starts a Ray of its own (``cluster=ray_local``) and SIGTERM goes to its whole process group,
    as ``kill -TERM -<pgid>`` or job control sends it. Ray's processes and its workers run in process groups
    of their own, so the driver alone gets it, as when it is signalled alone. Chunks of 100000 steps: the
    ranks stop inside a chunk, at a step the controller set for all.

    ``workers_too``: every worker process gets SIGTERM as well, just after the driver (an eviction of all
    the run's pods at once). Each worker's notice asks to leave, but the driver's own stop comes first: the
    ranks still working through their grace period save the step in flight, and nothing is replaced."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ray_run = (
        *THREE_WORKERS,
        "probes.preflight=false",
    )
    # Its Ray's workers at nice 2 (cluster.local_worker_niceness); the tests' Ray starts them at 0, as runs do.
    driver = _driver(run_dir, *ray_run, "cluster.chunk_steps=100000", "cluster.local_worker_niceness=2")
    up = _wait_for(driver, "worker group up")
    [started] = [line for line in up if "worker actors up" in line]
    time.sleep(3.0)  # a few dozen steps into the first chunk
    os.killpg(driver.pid, signal.SIGTERM)
    if workers_too:
        pids = [int(pid) for pid in re.findall(r"'pid': (\d+)", started)]
        assert len(pids) >= 3, started
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    out = _finish(driver)
    assert driver.returncode == ExitCode.PREEMPTED, out[-3000:]
    saved = _assert_saved(run_dir, at_least=1)
    assert not events(run_dir, "failure"), "stopping the ranks is not a failure"
    assert not events(run_dir, "recovered"), "no rank was replaced"
    if not workers_too:
        assert not events(run_dir, "worker_preempted"), "the workers were not signalled"
    assert f"outcome: preempted at step {saved} (saved)" in out
    assert {m["nice"] for m in events(run_dir, "group_started")[0]["members"]} == {2}
    assert any("worker processes run at nice 2" in line for line in up)

    # The same run resumed on the tests' Ray, in this process: what is checked is what the signal left.
    again = make_config(*TINY, *ray_run, "cluster.chunk_steps=5", f"train.steps={saved + 2}")
    assert run(again, run_dir=run_dir) == ExitCode.FINISHED
    assert [e["step"] for e in events(run_dir, "resumed")] == [saved]
    assert {m["nice"] for m in events(run_dir, "group_started")[-1]["members"]} == {0}


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize(
    ("when", "timing"),
    [
        # Suite time: the notice between chunks runs under --slow; the harder case, inside a chunk, by default.
        pytest.param(
            "between chunks",
            ("cluster.chunk_steps=6", "checkpoint.interval_steps=12"),
            marks=pytest.mark.slow,
        ),
        # Steps slowed by a delay in every collective, so the notice is seen while the chunk runs.
        (
            "inside a chunk",
            ("cluster.chunk_steps=24", "+faults.families={sim_npu: {collective_delay_s: 0.05}}"),
        ),
    ],
)
def test_sigterm_to_one_worker_is_a_planned_removal_and_nothing_is_lost(
    when: str, timing: tuple[str, ...], tmp_path: Path
) -> None:
    """Rank 1 of 3 gets SIGTERM (as from a node drain) at step 9: every rank stops after the step in
    flight (or is idle between chunks), a spare takes rank 1 with a peer's state of that step, no failure
    is counted, and the final state is bit for bit the uninterrupted run's."""
    three = (
        *THREE_WORKERS,
        "+task._target_=trainer.testing.tasks.ClusterTask",
        "train.global_batch_size=12",
        "train.steps=24",
        "probes.preflight=false",
        "probes.interval_steps=0",
        "monitoring=off",
        *timing,
    )
    clean = make_config(*three)
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    asked = make_config(*three, "faults.kill_rank=1", "faults.kill_at_step=9", "faults.kill_signal=SIGTERM")
    assert run(asked, run_dir=tmp_path / "asked") == ExitCode.FINISHED

    assert events(tmp_path / "asked", "failure") == []
    [preempted] = events(tmp_path / "asked", "worker_preempted")
    assert preempted["ranks"] == [1] and when in preempted["detail"]
    [decision] = events(tmp_path / "asked", "decision")
    assert decision["action"] == "replace_worker" and "planned removal" in decision["reason"]
    [recovered] = events(tmp_path / "asked", "recovered")
    assert recovered["replaced_ranks"] == [1] and recovered["state_from"].startswith("peer snapshot")
    assert recovered["step"] == preempted["step"] >= 9, "stopped after the step in flight, resumed there"
    a = restored_state(clean, tmp_path / "clean" / "checkpoints")
    b = restored_state(clean, tmp_path / "asked" / "checkpoints")
    assert mismatched(a, b) == []
