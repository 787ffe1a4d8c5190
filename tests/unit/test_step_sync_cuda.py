"""On a CUDA device, with an optimizer that skips a non-finite step on the device (AdamW's fused kernel), a
training step never waits for the device: CUDA's sync debug mode, set to raise, sees no synchronising call
in three steps. A NaN step among them is still skipped, and the host learns it when it settles. Needs an
NVIDIA GPU (``scripts/bench/gpu_checks.sh`` runs it there); skipped here."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from trainer.config import Config
from trainer.worker import Worker

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none on this host)"
)


def test_a_step_with_a_fused_optimizer_never_synchronises(make_config: Callable[..., Config]) -> None:
    worker = Worker(
        make_config(
            "device=cuda",
            "model=gpt_tiny",
            "optim.fused=true",
            "train.global_batch_size=8",
            "monitoring=off",
        )
    )
    worker.setup()
    for _ in range(2):  # the optimizer's state and the first allocations are made here
        worker.train_step()
    torch.cuda.synchronize()
    worker.nonfinite.settle()
    params = [p.detach().clone() for p in worker.module.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        worker.train_step()
        worker.train_step()
        # A NaN weight: step 5's gradients are not finite. Writing a host scalar into the device's memory
        # synchronises; that is the test's doing, not the step's, so it is left out of the watch.
        torch.cuda.set_sync_debug_mode("default")
        with torch.no_grad():
            first = next(worker.module.parameters())
            saved = first.detach().clone()
            first.view(-1)[0] = float("nan")
        torch.cuda.set_sync_debug_mode("error")
        worker.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    worker.nonfinite.settle()
    assert worker.nonfinite.skipped == [5]
    with torch.no_grad():
        first.copy_(saved)
    assert not all(torch.equal(a, b) for a, b in zip(params, worker.module.parameters(), strict=True))
