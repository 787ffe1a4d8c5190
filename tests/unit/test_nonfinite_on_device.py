"""A non-finite step with an optimizer that skips on the device (torch's fused SGD and AdamW): the step hands
the decision to the optimizer and does not wait for it; the host learns it one step later (or when the chunk
ends, or before a save), and only then steps the LR scheduler — exactly as on the host-decided path.

One worker in this process, :class:`trainer.testing.tasks.ClusterTask` (SGD with momentum, a StepLR schedule)
with a NaN loss at step 3.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from trainer.config import Config
from trainer.errors import UserCodeError
from trainer.nonfinite import skips_on_device
from trainer.worker import Worker


def _worker(make_config: Callable[..., Config], fused: bool, *extra: str) -> Worker:
    worker = Worker(
        make_config(
            "device=cpu",
            "+task._target_=trainer.testing.tasks.ClusterTask",
            "+task.nan_at=[3]",
            f"+task.fused={str(fused).lower()}",
            "train.global_batch_size=8",
            "train.prefetch=false",
            *extra,
        )
    )
    worker.setup()
    return worker


def _params(worker: Worker) -> list[torch.Tensor]:
    return [p.detach().clone() for p in worker.module.parameters()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_device_skips_the_step_and_the_host_learns_it_a_step_later(
    make_config: Callable[..., Config],
) -> None:
    worker = _worker(make_config, fused=True)
    worker.train_step()
    assert not skips_on_device(worker.optimizer) or worker.optimizer.state  # fused SGD: host decides step 1
    worker.train_step()
    assert skips_on_device(worker.optimizer)  # its momentum buffers exist now
    before = _params(worker)
    momentum = [s["momentum_buffer"].clone() for s in worker.optimizer.state.values()]

    worker.train_step()  # step 3: NaN loss
    # The optimizer skipped the update on its own flag; the host has not looked at it yet.
    assert _equal(before, _params(worker))
    assert _equal(momentum, [s["momentum_buffer"] for s in worker.optimizer.state.values()])
    assert worker.nonfinite.skipped == []
    assert worker.scheduler.last_epoch == 2  # steps 1 and 2 moved the schedule; step 3 is undecided

    worker.train_step()  # step 4 reads step 3's flag before its own optimizer step
    assert worker.nonfinite.skipped == [3]
    assert worker.scheduler.last_epoch == 2  # the skipped step did not move it
    assert not _equal(before, _params(worker))
    worker.nonfinite.settle()  # as the end of a chunk does
    assert worker.scheduler.last_epoch == 3


def test_the_same_run_as_the_host_deciding_on_the_same_optimizer(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fused SGD decided on the device against the same fused SGD decided on the host: the same parameters,
    momentum and schedule after the skip, bit for bit."""
    device = _worker(make_config, fused=True)
    for _ in range(6):
        device.train_step()
    device.nonfinite.settle()
    monkeypatch.setattr("trainer.worker.skips_on_device", lambda optimizer: False)
    host = _worker(make_config, fused=True)
    for _ in range(6):
        host.train_step()
    assert device.nonfinite.skipped == host.nonfinite.skipped == [3]
    assert _equal(_params(device), _params(host))
    momentum = [[s["momentum_buffer"] for s in w.optimizer.state.values()] for w in (device, host)]
    assert _equal(*momentum)
    assert device.scheduler.state_dict() == host.scheduler.state_dict()


def test_a_save_settles_the_last_step_first(make_config: Callable[..., Config]) -> None:
    worker = _worker(make_config, fused=True)
    for _ in range(3):
        worker.train_step()
    state = worker.capture()
    assert worker.nonfinite.skipped == [3]
    assert state.task_state["extra"]["trainer/skipped_steps"] == [3]
    assert state.task_state["scheduler"]["last_epoch"] == 2  # steps 1 and 2: the skipped step 3 is settled


def test_too_many_in_a_row_stop_when_the_host_reads_them(make_config: Callable[..., Config]) -> None:
    worker = _worker(make_config, True, "train.max_nonfinite_steps=1")
    for _ in range(3):
        worker.train_step()
    with pytest.raises(UserCodeError, match=r"1 consecutive steps \(3\.\.3\)"):
        worker.nonfinite.settle()


def test_optimizers_that_cannot_skip_on_the_device_are_decided_on_the_host() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    assert not skips_on_device(torch.optim.AdamW([param]))
    assert not skips_on_device(torch.optim.SGD([param], lr=0.1, momentum=0.9))
    assert skips_on_device(torch.optim.AdamW([param], fused=True))
    fused_sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9, fused=True)
    assert not skips_on_device(fused_sgd)  # its first step would leave uninitialised buffers if skipped
    param.grad = torch.ones(2)
    fused_sgd.step()
    assert skips_on_device(fused_sgd)
    assert skips_on_device(torch.optim.SGD([param], lr=0.1, fused=True))  # no momentum: nothing to initialise
