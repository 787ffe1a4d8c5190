"""One run lifecycle: the same short run on one process (``cluster=local``) and on a Ray group of one
member journals the same story — the same events with the same fields, at the same steps — through a
start, periodic checkpoints, the end, and a resume; and both end the same way when the final checkpoint
cannot be written."""

from __future__ import annotations

import os
import signal
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
from trainer.summary import summarize
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

SMALL = (
    "device=sim_npu",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.log_interval=5",
    "monitoring=off",
)
PATHS = {
    "process": ("cluster=local",),
    "group": ("cluster=ray_local", "cluster.workers=1", "cluster.chunk_steps=5", "probes.preflight=false"),
}
#: The driver's lifecycle records (the group's own — probes, backend timeouts, relays — are not compared).
LIFECYCLE = (
    "run_started",
    "group_started",
    "checkpoint_skipped",
    "resumed",
    "checkpoint_started",
    "checkpoint_saved",
    "checkpoint_failed",
    "heartbeat",
    "goodput",
    "run_finished",
    "run_failed",
    "run_aborted",
)


def _story(run_dir: Path) -> dict[str, Any]:
    """Per lifecycle event: how often, its fields, and the values that must agree (which step, which family;
    not who, where or how long)."""
    entries = [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] in LIFECYCLE]
    story: dict[str, Any] = {}
    for name in LIFECYCLE:
        of = [e for e in entries if e["event"] == name]
        if of:
            fields = sorted({k for e in of for k in e} - {"time"})
            same = [{k: e[k] for k in ("step", "family", "from_family", "world_size") if k in e} for e in of]
            story[name] = {"count": len(of), "fields": fields, "values": same}
    return story


def test_one_process_and_a_group_of_one_journal_the_same_run(
    make_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stories, summaries = {}, {}
    for path, overrides in PATHS.items():
        first = make_config(*SMALL, *overrides, "train.steps=12", "checkpoint.interval_steps=5")
        assert run(first, run_dir=tmp_path / path) == ExitCode.FINISHED
        again = make_config(*SMALL, *overrides, "train.steps=16", "checkpoint.interval_steps=5")
        assert run(again, run_dir=tmp_path / path) == ExitCode.FINISHED  # resumes at 12
        stories[path] = _story(tmp_path / path)
        out = capsys.readouterr().out
        summaries[path] = [line for line in out.splitlines() if line.startswith(("outcome:", "failures:"))]

    story = stories["process"]
    assert story == stories["group"]
    assert story["resumed"]["values"] == [{"step": 12, "from_family": "sim_npu", "family": "sim_npu"}]
    assert [v["step"] for v in story["checkpoint_saved"]["values"]] == [5, 10, 12, 15, 16]
    assert "recoveries" in story["run_finished"]["fields"]
    assert summaries["process"] == summaries["group"]
    assert summaries["process"][-2:] == [
        "outcome: finished; families: sim_npu",
        "failures: none; recoveries: 0; degraded probes: 0",
    ]


@pytest.mark.parametrize("path", PATHS)
def test_a_final_checkpoint_that_cannot_be_written_fails_the_run(
    make_config: Callable[..., Config], tmp_path: Path, small_disk: Path, path: str
) -> None:
    config = make_config(
        *SMALL, *PATHS[path], "train.steps=30", "checkpoint.interval_steps=10", f"checkpoint.dir={small_disk}"
    )
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FAILED

    events = Journal(tmp_path / "run" / "journal.jsonl").read()
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert failed and "No space left on device" in failed[0]["error"]
    assert [e["step"] for e in failed] == [20, 30]
    [ended] = [e for e in events if e["event"] in ("run_failed", "run_finished", "run_aborted")]
    assert ended["event"] == "run_failed" and ended["step"] == 30
    assert summarize(events)["outcome"] == "failed"
    store = CheckpointStore(small_disk)
    assert [p.name for p in store.committed()] == ["step_000000010"]


@pytest.mark.parametrize("path", PATHS)
def test_a_preemption_whose_save_cannot_be_written_says_nothing_was_saved(
    tmp_path: Path, small_disk: Path, path: str
) -> None:
    """SIGTERM to the driver once the disk is full (step 10 fills it, step 20's save fails): the run stops
    as preempted (exit 5), journals that nothing was saved, and the step-10 checkpoint stays."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [*SMALL, *PATHS[path], "train.steps=100000", "checkpoint.interval_steps=10"]
    command = [sys.executable, "-m", "trainer", *overrides, f"checkpoint.dir={small_disk}"]
    driver = subprocess.Popen(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert driver.stdout is not None
        for line in driver.stdout:  # the run cannot end by itself: only the signal stops it
            if line.startswith("step 25/"):
                break
        os.killpg(driver.pid, signal.SIGTERM)
        out, _ = driver.communicate(timeout=180)
    finally:
        driver.kill()
    assert driver.returncode == ExitCode.PREEMPTED, out[-3000:]
    [preempted] = [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] == "preempted"]
    assert preempted["saved_step"] is None and preempted["step"] >= 25
    assert "No space left on device" in preempted["reason"]
    assert "nothing saved" in out
    store = CheckpointStore(small_disk)
    assert [p.name for p in store.committed()] == ["step_000000010"]


def test_a_run_on_one_process_imports_no_ray(tmp_path: Path) -> None:
    """A group of one is driven by the same controller as a Ray group, not through Ray: a run on one process
    never imports Ray."""
    code = (
        "import sys; from trainer.job import run; from trainer.testing.configs import make_config; "
        f"code = run(make_config(*{SMALL!r}, 'cluster=local', 'train.steps=2'), run_dir={str(tmp_path)!r}); "
        "print(int(code), 'ray' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert done.stdout.split()[-2:] == [str(int(ExitCode.FINISHED)), "False"], done.stderr[-3000:]


def test_a_hung_step_on_one_process_is_found_and_the_run_restarts_from_its_checkpoint(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The group of one is watched as a Ray group is: a step that stops making progress is found by its
    missing progress mark, and the policy's restart starts a new group of one from the newest checkpoint —
    the run then ends with the state an uninterrupted run ends with, bit for bit."""
    base = (
        *SMALL,
        "cluster=local",
        "train.steps=20",
        "checkpoint.interval_steps=10",
        "probes.preflight=false",
    )
    clean = make_config(*base)
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    hung = make_config(
        *base, "faults.hang_rank=0", "faults.hang_at_step=13", "fault_tolerance.hang_floor_s=2"
    )
    assert run(hung, run_dir=tmp_path / "hung") == ExitCode.FINISHED

    journal = Journal(tmp_path / "hung" / "journal.jsonl").read()
    [detected] = [e for e in journal if e["event"] == "hang_detected"]
    assert detected["ranks"] == [0] and detected["step"] == 10
    [recovered] = [e for e in journal if e["event"] == "recovered"]
    assert recovered["state_from"] == "disk checkpoint" and recovered["step"] == 10
    assert [e["family"] for e in journal if e["event"] == "group_started"] == ["sim_npu", "sim_npu"]
    a = restored_state(clean, tmp_path / "clean" / "checkpoints")
    assert mismatched(a, restored_state(clean, tmp_path / "hung" / "checkpoints")) == []


def test_a_kill_fault_and_more_workers_are_refused_for_one_process(
    make_config: Callable[..., Config],
) -> None:
    with pytest.raises(ConfigError, match="the one worker is the driver's own process"):
        make_config(*SMALL, "cluster=local", "faults.kill_rank=0", "faults.kill_at_step=3")
    with pytest.raises(ConfigError, match=r"cluster\.workers=2 with cluster\.mode=process; allowed: 1"):
        make_config(*SMALL, "cluster=local", "cluster.workers=2")
