"""The next step's batches are collated ahead on a background thread: the batches are the ones the step would
have read itself, the dataset is never called twice at once, a stale position is dropped, a user error still
names the hook, and training with and without read-ahead ends in the same state bit for bit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import Config
from trainer.data.prefetch import Prefetcher
from trainer.errors import ExitCode, UserCodeError
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.state import mismatched, restored_state
from trainer.worker import Worker


class Recorded:
    """A dataset that records which thread reads it and how many reads overlap."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s, self.lock = delay_s, threading.Lock()
        self.threads: set[str] = set()
        self.inside = self.most_inside = 0

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> torch.Tensor:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        with self.lock:
            self.inside -= 1
        return torch.full((2,), float(i))


def made(data: Recorded) -> Callable[[list[int]], Any]:
    return lambda indices: torch.stack([data[i] for i in indices])


def test_batches_read_ahead_are_the_batches_asked_for_and_made_on_the_background_thread() -> None:
    data = Recorded()
    prefetch = Prefetcher(made(data), pin=False, enabled=True)
    try:
        prefetch.ahead([[1, 2], [3, 4]])
        assert torch.equal(prefetch.get([1, 2]), made(Recorded())([1, 2]))
        assert torch.equal(prefetch.get([3, 4]), made(Recorded())([3, 4]))
        assert data.threads and all(name.startswith("prefetch") for name in data.threads)
    finally:
        prefetch.close()


def test_a_position_not_read_ahead_drops_the_rest_and_the_dataset_is_never_read_twice_at_once() -> None:
    data = Recorded(delay_s=0.01)
    prefetch = Prefetcher(made(data), pin=False, enabled=True)
    try:
        prefetch.ahead([list(range(0, 20)), list(range(20, 40))])  # the next step, as the worker asks for it
        # A restore moved the position: another batch is asked for while the stale ones are being made.
        assert torch.equal(
            prefetch.get([500, 501]), torch.stack([torch.full((2,), 500.0), torch.full((2,), 501.0)])
        )
        assert data.most_inside == 1  # the stale batch finished before the wanted one was made
        assert prefetch.get(list(range(0, 20))).shape == (20, 2)  # dropped: made again, correctly
        assert "MainThread" in data.threads
    finally:
        prefetch.close()


def test_without_read_ahead_every_batch_is_made_on_the_callers_thread() -> None:
    data = Recorded()
    prefetch = Prefetcher(made(data), pin=False, enabled=False)
    prefetch.ahead([[1, 2]])
    assert prefetch.get([1, 2]).shape == (2, 2)
    assert data.threads == {"MainThread"}


def test_an_error_of_collate_on_the_prefetch_thread_is_the_users_error_naming_the_hook(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(
        "device=cpu",
        "+task._target_=trainer.testing.tasks.ClusterTask",
        "train.global_batch_size=8",
        "train.prefetch=true",
    )
    worker = Worker(config)
    worker.setup()
    worker.data.collate = _failing_collate(worker.data.collate)
    worker.train_step()  # step 1; step 2's batch is collated ahead and fails there
    with pytest.raises(UserCodeError, match=r"Task.train_dataset or collate raised KeyError.*step 2, rank 0"):
        worker.train_step()
    assert worker.step == 1


def _failing_collate(collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    calls = {"n": 0}

    def failing(samples: list[Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch made: step 2's, on the prefetch thread
            raise KeyError("label")
        return collate(samples)

    return failing


@pytest.mark.parametrize("accum", [1, 3])
def test_training_with_read_ahead_ends_bit_for_bit_where_training_without_it_does(
    make_config: Callable[..., Config], tmp_path: Path, accum: int
) -> None:
    states = []
    for prefetch in ("true", "false"):
        config = make_config(
            "device=cpu",
            "model.n_layer=1",
            "model.n_embd=32",
            "model.seq_len=16",
            "train.global_batch_size=8",
            f"train.grad_accum_steps={accum}",  # 3: micro-batches of 3 + 3 + 2, each read ahead
            "train.steps=12",
            "checkpoint.interval_steps=0",
            "monitoring=off",
            f"train.prefetch={prefetch}",
        )
        assert run(config, run_dir=tmp_path / prefetch) == ExitCode.FINISHED
        states.append(restored_state(config, tmp_path / prefetch / "checkpoints"))
        # The single process reports as a worker group does: one heartbeat per log line, every step once.
        beats = [
            e for e in Journal(tmp_path / prefetch / "journal.jsonl").read() if e["event"] == "heartbeat"
        ]
        assert [(b["first_step"], b["step"]) for b in beats] == [(1, 10), (11, 12)]
        assert all(b["loss"] > 0 and b["busy_s"] > 0 for b in beats)
    assert mismatched(*states) == []


@pytest.mark.parametrize(
    ("setting", "family", "reads_ahead"),
    [
        # The step uses the rank's every core: a collate thread would take turns with it.
        (None, "cpu", False),
        (None, "sim_cuda", False),  # a simulated accelerator computes on the host's CPU too
        ("true", "cpu", True),
        ("false", "cpu", False),
    ],
)
def test_read_ahead_is_off_by_default_where_the_device_is_the_cpu(
    make_config: Callable[..., Config], setting: str | None, family: str, reads_ahead: bool
) -> None:
    chosen = [] if setting is None else [f"train.prefetch={setting}"]
    worker = Worker(make_config(f"device={family}", "train.global_batch_size=8", *chosen))
    worker.setup()
    try:
        assert worker.prefetch.enabled is reads_ahead
    finally:
        worker.prefetch.close()
    assert worker.config.train.prefetches("cuda") is (setting != "false")  # an accelerator: on unless refused
