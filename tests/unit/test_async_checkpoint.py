"""Async checkpoints: the written state is the one at save time, even as training goes on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.config import Config
from trainer.worker import Worker


def _worker(make_config: Callable[..., Config], steps: int) -> Worker:
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
    for _ in range(steps):
        worker.train_step()
    return worker


def test_background_write_holds_the_state_of_save_time(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    worker = _worker(make_config, 2)
    at_save = {k: v.clone() for k, v in worker.module.state_dict().items()}
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=5)
    checkpointer = AsyncCheckpointer(manager)
    future = worker.save_async(checkpointer)
    for _ in range(3):  # training goes on and changes every parameter while the writer works
        worker.train_step()
    path = future.result(timeout=120)
    checkpointer.close()
    assert path.name == "step_000000002"

    fresh = _worker(make_config, 0)
    restored = fresh.restore(manager)
    assert restored is not None and restored.manifest.step == 2
    for key, value in fresh.module.state_dict().items():
        assert torch.equal(value, at_save[key]), key
    assert not torch.equal(worker.module.head.weight, at_save["head.weight"])


def test_saves_commit_in_order_and_reuse_staging(make_config: Callable[..., Config], tmp_path: Path) -> None:
    worker = _worker(make_config, 1)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=5)
    checkpointer = AsyncCheckpointer(manager)
    first = worker.save_async(checkpointer)
    staging = {k: v.data_ptr() for k, v in checkpointer.staging.tensors.items()}
    worker.train_step()
    second = worker.save_async(checkpointer)  # waits for the first commit before staging again
    assert first.done()
    assert {k: v.data_ptr() for k, v in checkpointer.staging.tensors.items()} == staging
    checkpointer.close()
    assert second.result().name == "step_000000002"
    assert [p.name for p in manager.store.committed()] == ["step_000000001", "step_000000002"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_000000002"
