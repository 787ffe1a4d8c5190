"""Staging buffers: one allocation holds a copy of the state, reused by every save and lent to snapshots."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointManager, TrainingProgress
from trainer.checkpoint.async_writer import AsyncCheckpointer
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
