"""Both ways to launch: from Python (``trainer.launch.launch``) and a Hydra sweep, whose jobs all run, each in its
own run directory, the process exiting with the worst outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer.errors import ExitCode
from trainer.journal import Journal
from trainer.launch import launch
from trainer.testing.tasks import ClusterTask

QUICK = ["device=cpu", "train.global_batch_size=8", "train.steps=4", "monitoring=off"]


def _finished(run_dir: Path) -> list[dict[str, object]]:
    return [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] == "run_finished"]


def test_launch_from_python_with_a_task_class_and_its_arguments(tmp_path: Path) -> None:
    code = launch(QUICK, task=ClusterTask, task_args={"hidden": 8, "lr": 0.1}, run_dir=tmp_path / "run")
    assert code == ExitCode.FINISHED
    [finished] = _finished(tmp_path / "run")
    assert finished["step"] == 4
    manifest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert '"hidden": 8' in (tmp_path / "run" / "checkpoints" / manifest / "manifest.json").read_text()


def test_a_sweep_runs_every_job_and_exits_with_the_worst_outcome(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "trainer",
        "-m",
        *QUICK,
        "model.n_layer=1",
        "model.n_embd=32",
        "model.seq_len=16",
        "optim.lr=1e-3,3e-4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for job in ("0", "1"):
        assert [e["step"] for e in _finished(tmp_path / "sweep" / job)] == [4]

    bad = [*command[:-2], "train.grad_clip=1.0,-1", f"hydra.sweep.dir={tmp_path / 'bad'}"]
    done = subprocess.run(bad, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == ExitCode.CONFIG_ERROR, done.stdout[-2000:] + done.stderr[-2000:]
    assert [e["step"] for e in _finished(tmp_path / "bad" / "0")] == [4]  # the good job still ran
    assert "train.grad_clip" in done.stderr
