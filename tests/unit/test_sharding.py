"""``train.parallelism=fsdp`` in two real processes joined by gloo: each rank holds a slice of every
parameter and of the optimizer state, a capture gathers them whole (the same on both ranks, equal to the
unsharded state), and a load into a sharded worker keeps the loaded state and shards it again."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.testing.configs import TWO_BLOCKS_CPU, make_config
from trainer.testing.s3 import free_port
from trainer.worker import Worker

OVERRIDES = (
    *TWO_BLOCKS_CPU,
    "train.global_batch_size=4",
    "train.parallelism=fsdp",
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


def _rank_trained(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    worker = Worker(make_config(*OVERRIDES))
    worker.setup()
    worker.attach(rank, 2)
    state_after_sharding = len(worker.optimizer.state)
    for _ in range(2):
        worker.train_step()
    captured = {k: t.clone() for k, t in worker.capture().tensors.items()}
    torch.save(
        {"state_after_sharding": state_after_sharding, "captured": captured}, os.path.join(out, f"{rank}.pt")
    )
    dist.destroy_process_group()


def test_sharding_a_fresh_model_trains_as_one_process_does(tmp_path: Path) -> None:
    """Sharding a fresh model must not step its optimizer: a transfer of the unsharded optimizer's state
    initialises it with a zero-gradient step (torch.distributed.checkpoint does so for an empty state), and
    AdamW's first real step then corrects its moments as a second one — a smaller first update than one
    process makes (by ~8e-4 on a weight after the first step here). Two FSDP ranks against one process, two
    AdamW steps on the same samples; the ranks' reduce-scatter sums in another order (atol 1e-5)."""
    mp.spawn(_rank_trained, args=(free_port(), str(tmp_path)), nprocs=2)
    sharded = torch.load(tmp_path / "0.pt", weights_only=True)
    assert sharded["state_after_sharding"] == 0
    alone = Worker(make_config(*OVERRIDES[:-2], "monitoring=off"))
    alone.setup()
    for _ in range(2):
        alone.train_step()
    reference = alone.capture().tensors
    model = [k for k in reference if k.startswith("model")]
    assert model
    for key in model:
        assert torch.allclose(sharded["captured"][key], reference[key], rtol=1e-4, atol=1e-5), key
    steps = {float(t) for k, t in sharded["captured"].items() if k.endswith(".step")}
    assert steps == {2.0}
