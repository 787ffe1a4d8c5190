"""The public task API on one process: the user's state survives a resume bit for bit, the data position
is the framework's, and a task that breaks the contract is refused at launch, before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.api import Task
from trainer.config import Config
from trainer.data.positions import DataPositions
from trainer.errors import ConfigError, ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.state import mismatched, restored_state
from trainer.testing.tasks import ClusterTask

TASK = (
    "device=cpu",
    "+task._target_=trainer.testing.tasks.ClusterTask",
    "train.global_batch_size=8",
    "monitoring=off",
)


@pytest.fixture
def task_config(make_config: Callable[..., Config]) -> Callable[..., Config]:
    return lambda *extra: make_config(*TASK, *extra)


def test_a_resumed_task_continues_bit_for_bit_with_scheduler_and_extra_state(
    task_config: Callable[..., Config], tmp_path: Path
) -> None:
    straight = task_config("train.steps=20", "checkpoint.interval_steps=0")
    assert run(straight, run_dir=tmp_path / "straight") == ExitCode.FINISHED
    half = task_config("train.steps=10", "checkpoint.interval_steps=0")
    assert run(half, run_dir=tmp_path / "resumed") == ExitCode.FINISHED
    assert run(straight, run_dir=tmp_path / "resumed") == ExitCode.FINISHED

    a = restored_state(straight, tmp_path / "straight" / "checkpoints")
    b = restored_state(straight, tmp_path / "resumed" / "checkpoints")
    assert mismatched(a, b) == []
    # The hooks' state is part of what was compared, and it moved: 20 steps, the LR decayed 4 times.
    assert {"scheduler", "extra/steps_seen", "extra/ema.body.0.weight"} <= set(a)
    assert bytes(a["extra/steps_seen"].tolist()) == b"20"
    assert b'"last_epoch": 20' in bytes(a["scheduler"].tolist())


def test_gradient_accumulation_matches_the_whole_batch(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    base = (
        "device=cpu",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.seq_len=16",
        "optim=sgd",
        "monitoring=off",
    )
    states = []
    for accum in (1, 4, 3):  # 3: micro-batches of 3 + 3 + 2, each mean loss weighted by its size
        config = make_config(
            *base, "train.steps=5", "train.global_batch_size=8", f"train.grad_accum_steps={accum}"
        )
        assert run(config, run_dir=tmp_path / str(accum)) == ExitCode.FINISHED
        states.append(restored_state(config, tmp_path / str(accum) / "checkpoints"))
    whole, *micros = states
    for micro in micros:
        for key, value in whole.items():  # the same sum of gradients, added in another order
            assert torch.allclose(value.double(), micro[key].double(), rtol=1e-4, atol=1e-6), key
        assert any(not torch.equal(whole[k], micro[k]) for k in whole if k.startswith("model/"))


def test_data_positions_shuffle_each_epoch_and_depend_on_the_index_alone() -> None:
    data = list(range(10))
    a = DataPositions(data, seed=7, collate=list)
    epochs = [[a.item(e * 10 + i) for i in range(10)] for e in range(3)]
    assert all(sorted(items) == data for items in epochs)  # every item once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
    b = DataPositions(data, seed=7, collate=list)
    assert [b.item(i) for i in (25, 3, 17)] == [epochs[2][5], epochs[0][3], epochs[1][7]]  # random access
    assert a.batch([0, 1]) == [epochs[0][0], epochs[0][1]]
    assert [DataPositions(data, seed=8, collate=list).item(i) for i in range(10)] != epochs[0]


# Broken tasks, named by ``test_task_api.<class>`` (pytest puts this directory on sys.path).
class _Base(ClusterTask):
    train_step = Task.train_step  # the framework's step, so that the launch check calls loss()


class NoLoss(torch.nn.Module):  # not a Task at all
    pass


class WideLoss(_Base):
    def loss(self, model: Any, batch: Any) -> torch.Tensor:
        return torch.ones(3)


class EmptyData(_Base):
    def train_dataset(self) -> Any:
        return []


class SetState(_Base):
    def extra_state(self) -> dict[str, Any]:
        return {"seen": {1, 2}}


class TextMetrics(_Base):
    def metrics(self) -> dict[str, float]:
        return {"accuracy": "high"}  # type: ignore[dict-item]


class ReservedState(_Base):
    def extra_state(self) -> dict[str, Any]:
        return {"trainer/skipped_steps": []}


class CompiledModel(_Base):
    def build_model(self, device: torch.device) -> torch.nn.Module:
        return torch.compile(super().build_model(device))  # type: ignore[return-value]


class RaisingLoss(_Base):
    def loss(self, model: Any, batch: Any) -> torch.Tensor:
        raise KeyError("label")


@pytest.mark.parametrize(
    ("target", "extra", "expected"),
    [
        ("no_such_pkg.Task", (), "task._target_='no_such_pkg.Task' could not be built"),
        ("test_task_api.NoLoss", (), "builds a NoLoss; allowed: a subclass of trainer.api.Task"),
        ("test_task_api.WideLoss", (), "loss returned a tensor of shape [3]; allowed: a scalar"),
        ("test_task_api.EmptyData", (), "train_dataset returned a dataset of length 0"),
        ("test_task_api.SetState", (), "extra state 'seen' is a set"),
        ("test_task_api.RaisingLoss", (), "loss raised KeyError: 'label'"),
        ("test_task_api.CompiledModel", (), "build_model returned a torch.compile'd module"),
        ("test_task_api.TextMetrics", (), "metrics returned {'accuracy': 'high'}"),
        ("test_task_api.ReservedState", (), "uses the key 'trainer/skipped_steps'"),
        ("trainer.testing.tasks.ClusterTask", ("train.grad_accum_steps=2",), "train_step is overridden"),
    ],
)
def test_a_task_breaking_the_contract_is_refused_before_anything_is_written(
    make_config: Callable[..., Config], tmp_path: Path, target: str, extra: tuple[str, ...], expected: str
) -> None:
    config = make_config("device=cpu", f"+task._target_={target}", "train.global_batch_size=8", *extra)
    with pytest.raises(ConfigError, match="task") as caught:
        run(config, run_dir=tmp_path / "run")
    assert expected in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_task_lacking_a_required_hook_is_named(make_config: Callable[..., Config], tmp_path: Path) -> None:
    config = make_config("device=cpu", "+task._target_=trainer.api.Task", "train.global_batch_size=8")
    with pytest.raises(ConfigError, match="abstract method") as caught:
        run(config, run_dir=tmp_path / "run")
    assert "build_model" in str(caught.value) and "train_dataset" in str(caught.value)


def test_an_exception_in_the_users_code_stops_the_run_as_a_user_error(
    task_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = task_config("train.steps=20", "checkpoint.interval_steps=5", "+task.fail_at=8")
    assert run(config, run_dir=tmp_path) == ExitCode.USER_ERROR
    events = Journal(tmp_path / "journal.jsonl").read()
    [error] = [e for e in events if e["event"] == "user_error"]
    assert "Task.train_step raised KeyError: 'label' (step 8, rank 0)" in error["error"]
    assert "Traceback" in error["error"] and "raise KeyError" in error["error"]
    assert not any(e["event"] == "run_finished" for e in events)
    assert restored_state(config, tmp_path / "checkpoints")["step"] == 5  # the newest checkpoint is intact
