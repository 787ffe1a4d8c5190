"""``checkpoint.writer_priority``: the background writer at Linux's idle priority still commits whole,
verified checkpoints; the setting is checked like every other key."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer, set_thread_priority
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.worker import Worker

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def _worker(make_config: Callable[..., Config]) -> Worker:
    worker = Worker(
        make_config(
            "device=cpu",
            "model.n_layer=1",
            "model.n_embd=32",
            "model.seq_len=16",
            "train.global_batch_size=4",
        )
    )
    worker.setup()
    worker.train_step()
    return worker


@pytest.mark.parametrize(("priority", "policy"), [("normal", "SCHED_OTHER"), ("idle", "SCHED_IDLE")])
def test_the_writer_runs_at_its_priority_and_commits_a_verified_checkpoint(
    make_config: Callable[..., Config], tmp_path: Path, priority: str, policy: str
) -> None:
    worker = _worker(make_config)
    at_save = {k: v.clone() for k, v in worker.module.state_dict().items()}
    manager = CheckpointManager(tmp_path / "ckpt", writer_priority=priority)
    checkpointer = AsyncCheckpointer(manager)
    try:
        assert checkpointer.writer_policy() == getattr(os, policy)
        future = worker.save_async(checkpointer)
        worker.train_step()
        assert future.result(timeout=120).name == "step_000000001"
    finally:
        checkpointer.close()
    fresh = Worker(worker.config)
    fresh.setup()
    restored = fresh.restore(manager)  # verifies every file's digest before loading
    assert restored is not None and restored.manifest.step == 1
    for key, value in fresh.module.state_dict().items():
        assert torch.equal(value, at_save[key]), key


def test_threads_the_writer_starts_inherit_its_priority() -> None:
    """The file writers and uploads are threads the writer's thread starts: they run at its priority."""
    seen: list[int] = []

    def writer() -> None:
        set_thread_priority("idle")
        child = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
        child.start()
        child.join()

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread is left as it was


def test_an_unknown_priority_is_refused_naming_the_key(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.writer_priority.*normal, idle"):
        make_config("checkpoint.writer_priority=realtime")
