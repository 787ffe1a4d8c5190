"""Non-finite steps: a NaN loss on one rank makes its step a no-op on every rank, the run goes on, resume
after it is exact, and too many in a row stop the run as a user error — across a resume too.

The task is :class:`trainer.testing.tasks.ClusterTask` (a manual step with an LR scheduler and extra state)
whose loss is NaN at the steps named by ``task.nan_at`` on rank ``task.nan_rank``. Each test runs twice: with
torch's plain SGD (the host decides before the optimizer step) and its fused SGD (the optimizer skips on the
device; the host learns it a step later, and only then steps the LR scheduler).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.checkpoint import CheckpointStore
from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.configs import THREE_WORKERS, make_config
from trainer.testing.runs import events
from trainer.testing.state import mismatched, restored_state

LOCAL = (
    "+task._target_=trainer.testing.tasks.ClusterTask",
    "train.global_batch_size=12",
    "checkpoint.interval_steps=3",
    "monitoring=off",
)


FUSED = pytest.mark.parametrize("fused", ["false", "true"], ids=["host_decides", "device_skips"])


def _local(*extra: str) -> Config:
    return make_config(*LOCAL, *extra)


@FUSED
def test_a_nan_step_changes_nothing_and_resume_after_it_is_exact(tmp_path: Path, fused: str) -> None:
    nan = ("+task.nan_at=[7]", f"+task.fused={fused}")
    before = _local(*nan, "train.steps=6")
    assert run(before, run_dir=tmp_path / "six") == ExitCode.FINISHED
    assert run(_local(*nan, "train.steps=7"), run_dir=tmp_path / "seven") == ExitCode.FINISHED
    six = restored_state(before, tmp_path / "six" / "checkpoints")
    seven = restored_state(before, tmp_path / "seven" / "checkpoints")
    # Step 7 moved neither the model, nor the optimizer, nor the LR schedule; the task's own state (its
    # EMA, its step counter) saw the step, and the step is recorded as skipped.
    untouched = [k for k in six if k.startswith(("model/", "optim/")) or k == "scheduler"]
    assert untouched and mismatched({k: six[k] for k in untouched}, {k: seven[k] for k in untouched}) == []
    assert bytes(seven["skipped_steps"].tolist()) == b"[7]"
    [skipped] = events(tmp_path / "seven", "nonfinite_skipped")
    assert skipped["steps"] == [7]
    # The task's figures come with each heartbeat: at the end of each chunk (its checkpoints, then the end).
    assert [(e["step"], e["values"]["steps_seen"]) for e in events(tmp_path / "seven", "task_metrics")] == [
        (3, 3),
        (6, 6),
        (7, 7),
    ]

    # Stopped after the NaN step and resumed: the same final state as straight through.
    assert run(_local(*nan, "train.steps=12"), run_dir=tmp_path / "straight") == ExitCode.FINISHED
    resumed = _local(*nan, "train.steps=12")
    assert run(resumed, run_dir=tmp_path / "seven") == ExitCode.FINISHED
    a = restored_state(resumed, tmp_path / "straight" / "checkpoints")
    b = restored_state(resumed, tmp_path / "seven" / "checkpoints")
    assert int(b["step"]) == 12 and mismatched(a, b) == []


@FUSED
def test_nonfinite_steps_in_a_row_stop_the_run_as_a_user_error_across_a_resume(
    tmp_path: Path, fused: str
) -> None:
    overrides = ("+task.nan_at=[8,9,10]", "train.max_nonfinite_steps=3", f"+task.fused={fused}")
    # Steps 8 and 9 are skipped (two in a row: allowed); the checkpoint at step 9 records them.
    assert run(_local(*overrides, "train.steps=9"), run_dir=tmp_path) == ExitCode.FINISHED
    # Resumed: step 10 is the third in a row, counting the two before the restart.
    assert run(_local(*overrides, "train.steps=12"), run_dir=tmp_path) == ExitCode.USER_ERROR
    [error] = events(tmp_path, "user_error")
    assert "not finite" in error["error"] and "3 consecutive steps (8..10)" in error["error"]
    assert not events(tmp_path, "run_finished")[1:]  # only the first session finished
    store = CheckpointStore(tmp_path / "checkpoints")
    [newest] = store.committed()[-1:]
    store.verify(newest)
    assert newest.name == "step_000000009"


# The host-decided path is exercised by the single-process tests above; across ranks it runs under --slow.
@pytest.mark.parametrize(
    "fused",
    [
        pytest.param("false", marks=pytest.mark.slow, id="host_decides"),
        pytest.param("true", id="device_skips"),
    ],
)
@pytest.mark.usefixtures("local_ray")
def test_a_nan_on_one_rank_of_three_is_skipped_by_all(tmp_path: Path, fused: str) -> None:
    """Had one rank stepped with the NaN gradients, its weights would be NaN from then on and every later
    step non-finite on every rank: one skipped step, then a finished run, shows all three skipped it."""
    config = make_config(
        *LOCAL,
        *THREE_WORKERS,
        "cluster.chunk_steps=5",
        "probes.preflight=false",
        "train.steps=12",
        "train.max_nonfinite_steps=2",
        "+task.nan_at=[7]",
        "+task.nan_rank=1",
        f"+task.fused={fused}",
    )
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    journal = Journal(tmp_path / "journal.jsonl").read()
    assert [e["steps"] for e in journal if e["event"] == "nonfinite_skipped"] == [[7]]
    assert not [e for e in journal if e["event"] in {"failure", "user_error", "recovered"}]
    state = restored_state(config, tmp_path / "checkpoints")
    assert int(state["step"]) == 12 and bytes(state["skipped_steps"].tolist()) == b"[7]"
    # The task's own figures came with every heartbeat, from rank 0, at the chunk's last step.
    reported = [(e["step"], e["values"]) for e in journal if e["event"] == "task_metrics"]
    assert [step for step, _ in reported] == [3, 6, 9, 12]  # chunks end at each checkpoint (every 3)
    assert all(v["steps_seen"] == step and v["ema_drift"] > 0 for step, v in reported)
