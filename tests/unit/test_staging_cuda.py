"""On a CUDA device a save's copies of the parameters and optimizer state run on a side stream alongside the
next steps' forward and backward, fenced before the optimizer's next step: what is written is the state of
save time, bit for bit. Needs an NVIDIA GPU (``scripts/bench/gpu_checks.sh`` runs it there); skipped here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.config import Config
from trainer.worker import Worker

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none on this host)"
)


def _worker(make_config: Callable[..., Config], steps: int) -> Worker:
    worker = Worker(
        make_config("device=cuda", "model=gpt_small", "train.global_batch_size=16", "monitoring=off")
    )
    worker.setup()
    for _ in range(steps):
        worker.train_step()
    return worker


def test_overlapped_copies_hold_the_state_of_save_time(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    worker = _worker(make_config, 2)
    torch.cuda.synchronize()
    at_save = {k: v.detach().cpu().clone() for k, v in worker.module.state_dict().items()}
    moments = {
        name: worker.optimizer.state[p]["exp_avg"].detach().cpu().clone()
        for name, p in worker.module.named_parameters()
    }
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=5)
    checkpointer = AsyncCheckpointer(manager)
    future = worker.save_async(checkpointer)
    assert worker.optimizer._optimizer_step_pre_hooks  # the fence waits for the optimizer's next step
    for _ in range(3):  # the next steps change every parameter and moment while the copies may be in flight
        worker.train_step()
    # The fence ran at the next step (nothing left in flight); its hook stays, one, for the next save.
    assert checkpointer.staging._side_done is None and len(worker.optimizer._optimizer_step_pre_hooks) == 1
    path = future.result(timeout=300)
    checkpointer.close()
    assert path.name == "step_000000002"

    fresh = _worker(make_config, 0)
    assert fresh.restore(manager) is not None
    for key, value in fresh.module.state_dict().items():
        assert torch.equal(value.cpu(), at_save[key]), key
    for name, p in fresh.module.named_parameters():
        assert torch.equal(fresh.optimizer.state[p]["exp_avg"].cpu(), moments[name]), name
    assert not torch.equal(worker.module.head.weight.cpu(), at_save["head.weight"])
