"""``train.parallelism=fsdp`` in two real processes joined by gloo: each rank holds a slice of every
parameter and of the optimizer state, a capture gathers them whole (the same on both ranks, equal to the
unsharded state), and a load into a sharded worker keeps the loaded state and shards it again."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.testing.configs import make_config
from trainer.testing.s3 import free_port
from trainer.worker import Worker

OVERRIDES = (
    "device=cpu",
    "model.n_layer=2",
    "model.n_embd=16",
    "model.seq_len=8",
    "train.global_batch_size=4",
    "train.parallelism=fsdp",
    "monitoring=off",
)


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    worker = Worker(make_config(*OVERRIDES))
    worker.setup()
    unsharded = {k: v.detach().clone() for k, v in worker.module.state_dict().items()}
    worker.attach(rank, 2)
    local = sum(p.to_local().numel() for p in worker.module.parameters())
    total = sum(t.numel() for t in unsharded.values())
    for _ in range(2):
        worker.train_step()
    captured = worker.capture()  # collective: both ranks
    snap = {k: t.clone() for k, t in captured.tensors.items()}
    # A load into the sharded worker: its own capture back, then a capture again equals it.
    worker.load_snapshot({**worker.snapshot(), "tensors": snap})
    again = {k: t.clone() for k, t in worker.capture().tensors.items()}
    torch.save(
        {"local": local, "total": total, "captured": snap, "again": again}, os.path.join(out, f"{rank}.pt")
    )
    dist.destroy_process_group()


def test_each_rank_holds_a_slice_and_a_capture_gathers_the_whole_state(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["local"] + r1["local"] >= r0["total"] > max(r0["local"], r1["local"])  # slices (padding aside)
    assert r0["captured"].keys() == r1["captured"].keys()
    for key, tensor in r0["captured"].items():
        assert torch.equal(tensor, r1["captured"][key]), key  # whole, and the same on both ranks
        assert torch.equal(tensor, r0["again"][key]), key  # a load keeps the state, sharded again
    assert any(k.startswith("optimizer.state.") for k in r0["captured"])  # the AdamW moments too
