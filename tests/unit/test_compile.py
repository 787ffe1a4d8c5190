"""``train.compile=true``: the model's forward runs through ``torch.compile`` (inductor, real C++ kernels on
this CPU), its state dict keeps the plain model's keys, and a run resumed from a checkpoint in a fresh
compiled worker ends bit for bit where the uninterrupted compiled run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo

from trainer.checkpoint import CheckpointManager
from trainer.testing.configs import TINY_CPU, make_config
from trainer.testing.state import live_state, mismatched, trained_worker
from trainer.worker import Worker

COMPILED = (*TINY_CPU, "train.compile=true")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()  # graphs of another test's models are not this test's


def _losses(worker: Worker, steps: int) -> list[float]:
    return [float(worker.train_step().loss) for _ in range(steps)]


def test_the_compiled_model_trains_like_the_plain_one_and_keeps_its_keys() -> None:
    torch._dynamo.utils.counters.clear()
    compiled = trained_worker(make_config(*COMPILED))
    got = _losses(compiled, 4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    plain = trained_worker(make_config(*TINY_CPU))
    want = _losses(plain, 4)

    assert list(compiled.module.state_dict()) == list(plain.module.state_dict())
    # Other kernels, the same arithmetic up to rounding.
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_a_compiled_run_resumed_from_a_checkpoint_ends_bit_for_bit_as_the_uninterrupted_one(
    tmp_path: Path,
) -> None:
    config = make_config(*COMPILED)
    uninterrupted = trained_worker(config, 3)
    manager = CheckpointManager(tmp_path / "ckpt")
    uninterrupted.save(manager)
    for _ in range(3):
        uninterrupted.train_step()

    resumed = trained_worker(config)
    restored = resumed.restore(CheckpointManager(tmp_path / "ckpt"))
    assert restored is not None and restored.manifest.step == 3
    for _ in range(3):
        resumed.train_step()

    assert resumed.step == uninterrupted.step == 6
    assert mismatched(live_state(uninterrupted), live_state(resumed)) == []
    # The checkpoint is the plain model's: an uncompiled worker loads it too.
    plain = trained_worker(make_config(*TINY_CPU))
    assert plain.restore(CheckpointManager(tmp_path / "ckpt")) is not None
