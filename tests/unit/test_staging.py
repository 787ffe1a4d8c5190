"""Staging buffers: one allocation holds a copy of the state, reused by every save and lent to snapshots."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointManager, TrainingProgress
from trainer.checkpoint import staging as staging_module
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.manager import read_tensors
from trainer.checkpoint.manifest import Manifest
from trainer.checkpoint.staging import StagingBuffers
from trainer.checkpoint.state import PortableState
from trainer.devices import get_adapter


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "model.w": torch.randn(33, 7),
        "model.b": torch.randn(5).to(torch.bfloat16),
        "optimizer.state.w.step": torch.tensor(3.0),
        "extra.empty": torch.empty(0, 4),
        "extra.strided": torch.randn(6, 4).t(),  # not contiguous
        "extra.count": torch.tensor([1, 2, 3], dtype=torch.int64),
    }


def test_staged_copy_equals_the_state_and_is_taken_now() -> None:
    state = _state()
    staging = StagingBuffers()
    staged = staging.copy(state)
    assert list(staged) == list(state)
    for key, value in state.items():
        assert staged[key].dtype == value.dtype and torch.equal(staged[key], value), key
        assert staged[key].data_ptr() != value.data_ptr() or value.numel() == 0, key
    before = {k: v.clone() for k, v in state.items()}
    for value in state.values():
        value.zero_()  # training goes on
    assert all(torch.equal(staged[k], before[k]) for k in state)


def test_one_allocation_reused_and_each_tensor_saves_only_its_bytes() -> None:
    state = _state()
    staging = StagingBuffers()
    first = {k: v.data_ptr() for k, v in staging.copy(state).items()}
    size = staging.nbytes
    held = sum(v.nbytes for v in state.values())
    assert held <= size < held + 64 * len(state) + 4096  # each tensor 64-aligned, the buffer on a page
    state["model.w"].add_(1.0)
    staged = staging.copy(state)
    assert {k: v.data_ptr() for k, v in staged.items()} == first and staging.nbytes == size
    assert torch.equal(staged["model.w"], state["model.w"])
    for key, value in staged.items():
        assert value.untyped_storage().nbytes() == value.nbytes, key
        buffer = io.BytesIO()
        torch.save(value, buffer)
        assert len(buffer.getvalue()) < value.nbytes + 2048, key  # not the whole allocation


def test_tensors_of_64_kib_and_more_start_on_a_page() -> None:
    # So that an O_DIRECT write takes their bytes from where they lie (trainer.checkpoint.dcp_writer).
    torch.manual_seed(0)
    state = {
        "model.small": torch.randn(3),
        "model.big": torch.randn(70_001),
        "model.under": torch.randn(20_000).to(torch.bfloat16),  # 40 KB: packed
        "model.just": torch.randn(16_385),  # 65,540 bytes
        "extra.odd": torch.randn(5),
    }
    staging = StagingBuffers()
    staged = staging.copy(state)
    assert staged["model.big"].data_ptr() % 4096 == 0 and staged["model.just"].data_ptr() % 4096 == 0
    assert staged["model.under"].data_ptr() % 64 == 0
    assert all(torch.equal(staged[k], v) for k, v in state.items())
    assert staging.nbytes < sum(v.nbytes for v in state.values()) + 3 * 4096 + 64 * len(state)


def test_a_changed_layout_reallocates() -> None:
    staging = StagingBuffers()
    staging.copy(_state())
    bigger = {**_state(), "model.w": torch.randn(100, 7)}
    staged = staging.copy(bigger)
    assert torch.equal(staged["model.w"], bigger["model.w"])
    assert staging.nbytes >= sum(v.nbytes for v in bigger.values())


def test_stage_lends_the_save_buffers_after_the_pending_write(tmp_path: Path) -> None:
    adapter = get_adapter("cpu")
    checkpointer = AsyncCheckpointer(CheckpointManager(tmp_path / "ckpt"))
    state = _state()
    state.pop("extra.strided")
    future = checkpointer.save(
        PortableState(state, {}, {}),
        adapter.get_rng_state(torch.device("cpu")),
        adapter,
        TrainingProgress(1, 1, 1, 0),
        {},
    )
    saved = {k: v.data_ptr() for k, v in checkpointer.staging.tensors.items()}
    state["model.w"].add_(1.0)
    snapshot = checkpointer.stage(state)
    assert future.done()  # waited for the write before overwriting the buffers
    assert {k: v.data_ptr() for k, v in snapshot.items()} == saved
    assert torch.equal(snapshot["model.w"], state["model.w"])
    checkpointer.close()


def _trained() -> tuple[torch.nn.Linear, torch.optim.AdamW, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    moments = optimizer.state[model.weight]
    state = {
        "model.weight": model.weight.detach(),
        "model.bias": model.bias.detach(),
        **{f"optimizer.state.weight.{k}": v for k, v in moments.items()},
        "extra.count": torch.tensor([3]),
    }
    return model, optimizer, state


def test_on_the_cpu_the_optimizers_tensors_are_copied_beside_the_next_step_until_its_optimizer_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, optimizer, state = _trained()
    before = {k: v.clone() for k, v in state.items()}
    started, release = threading.Event(), threading.Event()
    real = staging_module._memmove_all

    def held(copies: list[tuple[int, int, int]]) -> None:  # a copy still running when training goes on
        started.set()
        release.wait(60)
        real(copies)

    monkeypatch.setattr(staging_module, "_memmove_all", held)
    staging = StagingBuffers()
    staged = staging.copy(state, overlap=optimizer)
    assert torch.equal(staged["extra.count"], before["extra.count"])  # not the optimizer's: copied now
    assert started.wait(60)
    model(torch.randn(2, 64)).sum().backward()  # forward and backward beside the copy
    waiting = threading.Thread(target=staging.wait_copied)
    stepping = threading.Thread(target=optimizer.step)
    waiting.start()
    stepping.start()
    stepping.join(0.5)
    assert stepping.is_alive() and waiting.is_alive()  # the step (and the writer) wait for the copy
    release.set()
    stepping.join(60)
    waiting.join(60)
    assert all(torch.equal(staged[k], before[k]) for k in state)  # the state as it was at the save
    assert not torch.equal(model.weight.detach(), before["model.weight"])  # and then the step ran
    optimizer.step()  # nothing in flight: a later step goes through the fence at once


def test_savers_that_share_an_optimizer_fence_it_together_and_follow_a_rebuilt_one() -> None:
    model, optimizer, state = _trained()
    first, second = StagingBuffers(), StagingBuffers()  # e.g. a checkpointer and a second one
    for _ in range(2):
        first.copy(state, overlap=optimizer)
        second.copy(state, overlap=optimizer)
        optimizer.step()  # both fences run; neither takes its hook down mid-iteration
    assert len(optimizer._optimizer_step_pre_hooks) == 2  # one each, not one per save
    rebuilt = torch.optim.AdamW(model.parameters(), lr=0.1)  # a restore or a hand-over builds anew
    rebuilt.step()
    state = {**state, **{f"optimizer.state.weight.{k}": v for k, v in rebuilt.state[model.weight].items()}}
    before = {k: v.clone() for k, v in state.items()}
    staged = first.copy(state, overlap=rebuilt)
    assert len(optimizer._optimizer_step_pre_hooks) == 1 and len(rebuilt._optimizer_step_pre_hooks) == 1
    rebuilt.step()
    assert all(torch.equal(staged[k], v) for k, v in before.items())


def test_an_async_save_on_the_cpu_commits_the_state_of_its_call_while_training_steps_on(
    tmp_path: Path,
) -> None:
    model, optimizer, state = _trained()
    before = {k: v.clone() for k, v in state.items()}
    adapter = get_adapter("cpu")
    checkpointer = AsyncCheckpointer(CheckpointManager(tmp_path / "ckpt"))
    future = checkpointer.save(
        PortableState(state, {}, {}),
        adapter.get_rng_state(torch.device("cpu")),
        adapter,
        TrainingProgress(1, 1, 1, 0),
        {},
        overlap=optimizer,
    )
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 64)).sum().backward()
        optimizer.step()
    path = future.result(timeout=120)
    checkpointer.close()
    loaded = {k: torch.zeros_like(v) for k, v in before.items()}
    read_tensors(path, loaded, Manifest.read(path).format_version)
    restored = loaded
    assert all(torch.equal(restored[k], before[k]) for k in before), [
        k for k in before if not torch.equal(restored[k], before[k])
    ]
