"""A rank's copy of its own shards (``train.parallelism=fsdp``, :mod:`trainer.shard_copy`) in three real
processes joined by gloo: each rank copies its shards at step 2, trains on to step 4; then the group is
dropped and formed again (as after a lost rank), every rank loads its own copy before joining, and training
from step 2 to 4 again gives bit for bit the state of the first time — parameters, optimizer state, data
position and RNG all follow the copy. The driver's bookkeeping of the copies (which set fits a group) and
the config key's validation run without Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.cluster.shard_copies import KeptShardCopies, ShardCopies, _CopySet, shard_copies_for
from trainer.errors import CheckpointIncompatibleError, ConfigError
from trainer.journal import Journal
from trainer.shard_copy import rebuild, take
from trainer.testing.configs import TWO_BLOCKS_CPU, make_config
from trainer.testing.s3 import free_port
from trainer.worker import Worker

OVERRIDES = (
    *TWO_BLOCKS_CPU,
    "device.num_threads=1",
    "train.global_batch_size=6",
    "train.parallelism=fsdp",
)


def _state(worker: Worker) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in worker.capture().tensors.items()}  # gathered whole: every rank calls


def _rank(rank: int, ports: tuple[int, int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=3)
    worker = Worker(make_config(*OVERRIDES))
    worker.setup()
    worker.attach(rank, 3)
    for _ in range(2):
        worker.train_step()
    copy = worker.shard_copy()
    for _ in range(2):
        worker.train_step()
    first = _state(worker)
    losses = [float(worker.last_loss)]
    # The group is lost and formed again: each rank loads its own copy (before the join, as a repair does).
    worker.detach()
    dist.destroy_process_group()
    worker.load_snapshot(copy)
    assert worker.step == 2 and worker.pending_copy is not None
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=3)
    worker.attach(rank, 3)
    assert worker.pending_copy is None
    for _ in range(2):
        worker.train_step()
    again = _state(worker)
    losses.append(float(worker.last_loss))
    torch.save({"first": first, "again": again, "losses": losses}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # about 30 s here (three processes); tests/integration/test_fsdp.py proves it through Ray
def test_each_rank_goes_on_from_its_own_shard_copy_bit_for_bit(tmp_path: Path) -> None:
    mp.spawn(_rank, args=((free_port(), free_port()), str(tmp_path)), nprocs=3)
    for rank in range(3):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert result["losses"][0] == result["losses"][1]
        assert result["first"].keys() == result["again"].keys()
        assert any(k.startswith("optimizer.state.") for k in result["first"])  # the AdamW moments too
        for key, tensor in result["first"].items():
            assert torch.equal(tensor, result["again"][key]), (rank, key)


def test_a_copy_that_does_not_fit_the_live_state_is_refused() -> None:
    live = {"model.w": torch.zeros(2, 3), "model.b": torch.zeros(3)}
    copied = take({"model.w": torch.ones(2, 3), "model.b": torch.ones(3)})
    assert torch.equal(rebuild(copied, live)["model.w"], torch.ones(2, 3))
    with pytest.raises(CheckpointIncompatibleError, match=r"model\.b"):
        rebuild({"model.w": copied["model.w"]}, live)
    with pytest.raises(CheckpointIncompatibleError, match="reshaped"):
        rebuild({**copied, "model.w": torch.ones(1, 3)}, live)


def test_the_driver_uses_only_a_complete_set_that_fits_the_group(tmp_path: Path) -> None:
    copies = KeptShardCopies(1, Journal(tmp_path / "journal.jsonl"))
    assert copies.held(3, "sim_npu", 4) is None and "no shard copy" in copies.why_not
    copies.current = _CopySet(6, "sim_npu", ("r0", "r1", "r2"))
    held = copies.held(3, "sim_npu", 4)
    assert held is not None and held.origin == "shard copies at step 6" and held.refs == ("r0", "r1", "r2")
    assert copies.held(2, "sim_npu", 4) is None and "3 ranks" in copies.why_not  # another world size
    assert copies.held(3, "sim_cuda", 4) is None  # another family
    assert copies.held(3, "sim_npu", 8) is None and "step 8 is newer" in copies.why_not
    copies.drop("lost")
    assert copies.held(3, "sim_npu", 4) is None and copies.why_not == "lost"


def test_shard_copies_are_kept_under_fsdp_unless_switched_off(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    fsdp = ("device=cpu", "train.parallelism=fsdp", "monitoring=off")
    assert isinstance(shard_copies_for(make_config(*fsdp), journal), KeptShardCopies)
    off = make_config(*fsdp, "fault_tolerance.shard_copy_interval_steps=0")
    assert type(shard_copies_for(off, journal)) is ShardCopies
    assert type(shard_copies_for(make_config("device=cpu", "monitoring=off"), journal)) is ShardCopies
    with pytest.raises(ConfigError, match=r"fault_tolerance\.shard_copy_interval_steps.*integer >= 0"):
        make_config(*fsdp, "fault_tolerance.shard_copy_interval_steps=-1")
