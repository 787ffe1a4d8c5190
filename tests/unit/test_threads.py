"""The torch work a run does outside its training thread leaves no OpenMP team behind (trainer.threads): a
second team in the process throttles the training thread's (measured: 48-49 against 40-43 ms per step).

Whether a thread holds a team is seen from outside: its first parallel loop starts the team's worker
threads, and later ones reuse them. So after the toolkit's work on the calling thread, a parallel loop on
that thread must start a new worker thread. Each check runs in a fresh interpreter (this one's main thread
may hold a team from earlier tests), with two intra-op threads (one worker per team) on any host."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer.tasks import build_task
from trainer.testing.configs import make_config
from trainer.threads import on_passing_thread

#: Sizes whose set-up, forward and evaluation run parallel loops (the tests' TINY_CPU model is too small).
_CONFIG = (
    "'device=cpu', 'device.num_threads=2', 'model=gpt_tiny', 'train.global_batch_size=8', "
    "'train.eval_samples=16', 'monitoring=off', 'probes.preflight=false'"
)

#: Prints how many threads a parallel loop on the main thread started: 0 if the main thread held a team.
_PROBE = """
import os, torch
before = set(os.listdir("/proc/self/task"))
torch.exp(torch.ones(2048, 2048))
print("started", len(set(os.listdir("/proc/self/task")) - before))
"""


def _started_threads(script: str) -> int:
    code = textwrap.dedent(script) + _PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [line] = [line for line in out.stdout.splitlines() if line.startswith("started ")]
    return int(line.split()[1])


def test_the_probe_sees_a_team_the_main_thread_holds() -> None:
    assert _started_threads("import torch; torch.set_num_threads(2)") >= 1
    assert _started_threads("import torch; torch.set_num_threads(2); torch.exp(torch.ones(2048, 2048))") == 0


def test_an_in_process_run_leaves_the_calling_thread_without_a_team(tmp_path: Path) -> None:
    """The task check and the group of one's set-up, restore, evaluation and save ran in this run."""
    script = f"""
    from trainer.errors import ExitCode
    from trainer.job import run
    from trainer.testing.configs import make_config
    config = make_config({_CONFIG}, 'cluster=local', 'train.steps=4', 'checkpoint.interval_steps=2')
    assert run(config, run_dir={str(tmp_path)!r}) == ExitCode.FINISHED
    """
    assert _started_threads(script) >= 1


def test_a_worker_actors_calls_leave_their_caller_without_a_team(tmp_path: Path) -> None:
    """As Ray runs them: the constructor (set-up, initial weights loaded) on the actor's main thread, the
    calls on threads that outlive them."""
    config = make_config(*(arg.strip(" '") for arg in _CONFIG.split(",")))
    weights = tmp_path / "initial.pt"
    torch.save(build_task(config).build_model(torch.device("cpu")).state_dict(), weights)
    script = f"""
    from trainer.cluster.actor import WorkerActor
    from trainer.config import to_container
    from trainer.testing.configs import make_config
    config = make_config({_CONFIG}, 'train.init_weights={weights}')
    actor = WorkerActor(to_container(config), 1, own_process=False)
    actor.restore({str(tmp_path / "checkpoints")!r}, 2)
    actor.evaluate()
    actor.snapshot()
    actor.parameters()
    """
    assert _started_threads(script) >= 1


def test_on_passing_thread_returns_the_value_and_raises_the_error() -> None:
    assert on_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5

    def fails() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        on_passing_thread(fails)
