"""The workloads of ``examples/`` under the survival machinery on a Ray group: a worker SIGKILLed mid-run is
replaced from a peer snapshot, and the final state — model, optimizer, LR scheduler — is bit for bit the
uninterrupted run's. Sizes are cut down to a few seconds of training; each example's README has the full
command.

``examples`` is a package of the repository, not of the installed project: the driver imports it from the
repository root put on ``sys.path`` here, and Ray's workers from the directory the session's Ray was started
in, which Ray puts on their path (the suite runs from the repository root, as ``scripts/test.sh`` does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.configs import make_config
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))


SHORT_RUN = (
    "cluster=ray_local",
    "device=sim_npu",
    "train.steps=18",
    "checkpoint.interval_steps=10",
    "cluster.chunk_steps=5",
    "probes.preflight=false",
    "monitoring=off",
)


def killed_and_clean_agree(tmp_path: Path, *overrides: str, kill_at: int) -> dict[str, object]:
    """Run the job uninterrupted and with rank 1 SIGKILLed at step ``kill_at``; assert the kill was healed
    from a peer snapshot and both final states are bitwise equal. Returns the killed run's ``run_finished``."""
    clean = make_config(*SHORT_RUN, *overrides)
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    killed = make_config(*SHORT_RUN, *overrides, "faults.kill_rank=1", f"faults.kill_at_step={kill_at}")
    assert run(killed, run_dir=tmp_path / "killed") == ExitCode.FINISHED

    events = Journal(tmp_path / "killed" / "journal.jsonl").read()
    [recovered] = [e for e in events if e["event"] == "recovered"]
    assert recovered["replaced_ranks"] == [1] and recovered["state_from"].startswith("peer snapshot")
    a = restored_state(clean, tmp_path / "clean" / "checkpoints")
    b = restored_state(clean, tmp_path / "killed" / "checkpoints")
    assert mismatched(a, b) == []
    assert int(b["step"]) == 18 and "scheduler" in b
    [finished] = [e for e in events if e["event"] == "run_finished"]
    return finished


@pytest.mark.slow  # the same guarantee on another example runs by default (below)
def test_lm_on_stdlib_tokens_survives_a_killed_worker_bit_for_bit(tmp_path: Path) -> None:
    data = tmp_path / "tokens"
    done = subprocess.run(
        [sys.executable, "-m", "examples.lm_tokens.prepare", "--out", str(data), "--limit", "12"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert train.size > 10_000 and train.max() < 256 and b"import " in train.astype(np.uint8).tobytes()
    assert (data / "val.bin").stat().st_size > 0

    finished = killed_and_clean_agree(
        tmp_path,
        "+task._target_=examples.lm_tokens.task.TokenFileTask",
        f"+task.data_dir={data}",
        "+task.seq_len=32",
        "+task.n_layer=1",
        "+task.n_head=2",
        "+task.n_embd=32",
        "+task.decay_steps=18",
        "cluster.workers=2",
        "train.global_batch_size=8",
        kill_at=12,
    )
    assert 0 < finished["eval_loss"] < 6  # evaluated on val.bin; ln(256) = 5.5 before training


@pytest.mark.slow  # the same guarantee on another example runs by default (below)
def test_digits_survive_a_killed_worker_of_three_bit_for_bit(tmp_path: Path) -> None:
    finished = killed_and_clean_agree(
        tmp_path,
        "+task._target_=examples.digits.task.DigitsTask",
        "+task.lr_step=8",
        "cluster.workers=3",
        "cluster.cpus_per_worker=0.25",
        "train.global_batch_size=24",
        "train.eval_samples=297",
        kill_at=12,
    )
    assert 0.1 < finished["eval_loss"] <= 1  # the held-out accuracy, reported where the loss would be


SNIPPETS = (
    "+task._target_=examples.snippets.task.SnippetTask",
    "+task.warmup=10",
    "+task.grow_every=6",  # the curriculum's length doubles at steps 6 and 12: before and at the kill
    "cluster.workers=3",
    "cluster.cpus_per_worker=0.25",
    "train.global_batch_size=24",
    "train.eval_samples=256",
)


def test_a_model_returning_a_dataclass_survives_a_killed_worker_of_three_with_its_extra_state(
    tmp_path: Path,
) -> None:
    finished = killed_and_clean_agree(tmp_path, *SNIPPETS, kill_at=12)
    assert 0 < finished["eval_loss"] <= 1  # the held-out accuracy, reported where the loss would be

    state = restored_state(make_config(*SHORT_RUN, *SNIPPETS), tmp_path / "killed" / "checkpoints")
    assert bytes(state["extra/steps_seen"].tolist()) == b"18"  # the curriculum's position: one per step
    ema = {k.removeprefix("extra/ema."): v for k, v in state.items() if k.startswith("extra/ema.")}
    assert ema.keys() == {k.removeprefix("model/") for k in state if k.startswith("model/")}
    assert not any(torch.equal(ema[k], state[f"model/{k}"]) for k in ema)  # an average, not a copy
