"""``python -m trainer`` as a user runs it: exit codes, messages, resume from the same run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.errors import ExitCode

QUICK = [
    "experiment=quick",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.log_interval=5",
    "monitoring.port=0",
]


def _trainer(*overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_rerun_with_same_run_dir_resumes_from_latest(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _trainer(*QUICK, "train.steps=20", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == ExitCode.FINISHED, first.stderr
    assert f"run directory: {run_dir}" in first.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000000020"

    second = _trainer(*QUICK, "train.steps=30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert second.returncode == ExitCode.FINISHED, second.stderr
    assert "resumed from" in second.stdout and "at step 20" in second.stdout
    assert "step 25/30" in second.stdout and "step 5/30" not in second.stdout

    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("run_started") == 2 and kinds.count("run_finished") == 2
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["step"] == 20 and resumed["rng_restored"] is True
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000000030"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "device.family=tpu",
            "device.family='tpu' is not allowed; allowed: cpu, cuda, npu, sim_cuda, sim_npu, auto",
        ),
        (
            "checkpoint.interval_steps=-1",
            "checkpoint.interval_steps=-1 is not allowed; allowed: an integer >= 0",
        ),
        ("train.steps=???", "train.steps is missing"),
    ],
)
def test_bad_config_fails_at_launch_with_a_clear_message(
    override: str, expected: str, tmp_path: Path
) -> None:
    result = _trainer(*QUICK, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert expected in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing started


def test_resume_none_refuses_to_mix_with_existing_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert _trainer(*QUICK, "train.steps=10", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = _trainer(*QUICK, "checkpoint.resume=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert "checkpoint.resume='none'" in result.stderr and "already holds checkpoints" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
