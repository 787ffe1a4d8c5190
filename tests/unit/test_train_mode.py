"""The step trains in training mode after an evaluation left the model in eval mode (dropout on again), and
does not walk the model to set the mode on every step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.config import Config
from trainer.worker import Worker


def test_a_step_after_an_evaluation_trains_in_training_mode(make_config: Callable[..., Config]) -> None:
    worker = Worker(
        make_config("device=cpu", "train.eval_samples=8", "model.dropout=0.5", "train.prefetch=false")
    )
    worker.setup()
    worker.train_step()
    worker.evaluate()
    assert not any(m.training for m in worker.module.modules())  # what the next step must undo
    worker.train_step()
    assert all(m.training for m in worker.module.modules())


def test_the_mode_is_set_only_when_it_changed(make_config: Callable[..., Config]) -> None:
    worker = Worker(make_config("device=cpu", "train.eval_samples=8", "train.prefetch=false"))
    worker.setup()
    modes: list[bool] = []
    original = torch.nn.Module.train

    def counted(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        modes.append(mode)
        return original(module, mode)

    worker.module.train = counted.__get__(worker.module)  # type: ignore[method-assign]
    for _ in range(3):
        worker.train_step()
    assert modes == []
    worker.evaluate()
    worker.train_step()
    assert modes == [False, True]  # evaluate's eval(), then the one step's train()
