"""The FSDP mode of ``checkpoint.py`` (``--fsdp N``): the toolkit's sharded save against a synchronous
``dcp.save``, a gather-and-``torch.save`` by rank 0 and a raw write, per rank, in N gloo processes on this
host. See ``checkpoint.py``'s docstring for what is compared; prints one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from trainer.checkpoint import CheckpointManager, TrainingProgress
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.sharded import commit_parts, manifest_header, split
from trainer.checkpoint.state import capture
from trainer.checkpoint.store import CheckpointStore, fsync_path
from trainer.devices import get_adapter
from trainer.model import GPT
from trainer.testing.s3 import free_port


def build_sharded(megabytes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The GPT of ``checkpoint.py`` (about ``megabytes`` of parameters and AdamW state), each block and then
    the whole model sharded over the default group, its optimizer state materialised."""
    n_embd = 512
    layers = max(1, int(megabytes * 1e6 / 12 / (12 * n_embd * n_embd)))
    torch.manual_seed(0)
    model = GPT(vocab_size=4096, seq_len=128, n_layer=layers, n_head=8, n_embd=n_embd)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


def _sharded_save(
    checkpointer: AsyncCheckpointer,
    store: CheckpointStore,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
) -> tuple[float, float, int]:
    """The toolkit's sharded save: (this rank's blocking s, s from the call to the commit, bytes it wrote).
    The parts reach rank 0 by a gather here (the driver collects them through Ray in a run)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    adapter = get_adapter("cpu")
    box = [str(store.begin(step)) if rank == 0 else ""]
    dist.broadcast_object_list(box, src=0)
    directory = Path(box[0])
    dist.barrier()
    started = time.perf_counter()
    state = capture(model, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    local = split(state.tensors, rank)
    future = checkpointer.save_part(  # as a worker saves: the stepped shards' copies beside the next step
        directory, rank, local, adapter.rng_key(), adapter.get_rng_state(torch.device("cpu")), optimizer
    )
    blocking = time.perf_counter() - started
    part = future.result()
    parts: list[Any] = [None] * world
    dist.gather_object(part, parts if rank == 0 else None, dst=0)
    final = None
    if rank == 0:
        progress = TrainingProgress(step=step, samples_seen=step, world_size=world, seed=0)
        header = manifest_header(state, adapter.name, adapter.rng_key(), adapter.describe(), progress, {})
        final = commit_parts(store, directory, parts, header, world)
    dist.barrier()
    committed = time.perf_counter() - started
    if final is not None:
        store.retain(final)  # after the commit, as in a run: not part of the save's time
    dist.barrier()
    return blocking, committed, sum(f["bytes"] for f in part.files.values())


def _sync_dcp_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> float:
    """A synchronous collective ``dcp.save`` of the sharded state with DCP's own writer (fsynced)."""
    box = [str(directory / f"dcp-{time.monotonic_ns()}")]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    started = time.perf_counter()
    state = {
        "model": model.state_dict(),
        "optim": {str(i): s for i, s in enumerate(optimizer.state.values())},
    }
    dcp.save(state, checkpoint_id=box[0])
    elapsed = time.perf_counter() - started
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(box[0], ignore_errors=True)
    return elapsed


def _gathered_torch_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> float:
    """Every rank gathers the state whole (collectives); rank 0 ``torch.save``s it, fsynced."""
    dist.barrier()
    started = time.perf_counter()
    state = capture(model, optimizer, torch.amp.GradScaler("cpu", enabled=False)).tensors
    whole = {k: t.full_tensor() if isinstance(t, DTensor) else t for k, t in state.items()}
    if dist.get_rank() == 0:
        path = directory / "gathered.pt"
        torch.save(whole, path)
        fsync_path(path)
        path.unlink()
    dist.barrier()
    return time.perf_counter() - started


def _raw_write(nbytes: int, directory: Path) -> float:
    """Every rank at once writes ``nbytes`` (its share) sequentially, fsynced; the time to the last rank."""
    path = directory / f"raw-{dist.get_rank()}.bin"
    block = os.urandom(8 << 20)
    dist.barrier()
    started = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            n = min(len(block), nbytes - written)
            f.write(block[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())
    dist.barrier()
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, work: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    directory = Path(work)
    model, optimizer = build_sharded(args.megabytes)
    checkpointer = AsyncCheckpointer(CheckpointManager(directory / "ckpt"))
    store = CheckpointStore(directory / "ckpt", keep_last=1)
    names = ("blocking_s", "write_s", "sync_dcp_save_s", "gathered_torch_save_s", "raw_write_s")
    samples: dict[str, list[float]] = {
        k: [] for k in names + (("page_cache_write_s",) if args.page_cache else ())
    }
    written = 0
    _sharded_save(checkpointer, store, model, optimizer, 0)  # warm-up: the staging buffers are allocated once
    paged = None
    if args.page_cache:  # the same sharded save through the page cache (checkpoint.direct_io=false)
        paged = (
            AsyncCheckpointer(CheckpointManager(directory / "ckpt-paged", direct_io=False)),
            CheckpointStore(directory / "ckpt-paged", keep_last=1),
        )
        _sharded_save(paged[0], paged[1], model, optimizer, 0)
    for i in range(args.repeats):
        blocking, write, written = _sharded_save(checkpointer, store, model, optimizer, i + 1)
        samples["blocking_s"].append(blocking)
        samples["write_s"].append(write)
        if paged is not None:
            samples["page_cache_write_s"].append(
                _sharded_save(paged[0], paged[1], model, optimizer, i + 1)[1]
            )
        samples["sync_dcp_save_s"].append(_sync_dcp_save(model, optimizer, directory))
        samples["gathered_torch_save_s"].append(_gathered_torch_save(model, optimizer, directory))
        samples["raw_write_s"].append(_raw_write(written, directory))
    checkpointer.close()
    if paged is not None:
        paged[0].close()
    out = {"rank": rank, "samples": samples, "bytes": written, "staging_bytes": checkpointer.staging.nbytes}
    (directory / f"rank{rank}.pkl").write_bytes(pickle.dumps(out))
    dist.destroy_process_group()


def main_fsdp(args: argparse.Namespace) -> None:
    world = args.fsdp
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-fsdp-", dir=args.dir or os.getcwd()))
    try:
        mp.spawn(_rank, args=(world, free_port(), args, str(work)), nprocs=world)
        ranks = [pickle.loads((work / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Each repeat's figure is its slowest rank's (the group waits for it), then the median over repeats.
    slowest = {
        k: [max(r["samples"][k][i] for r in ranks) for i in range(args.repeats)] for k in ranks[0]["samples"]
    }
    med = {k: statistics.median(v) for k, v in slowest.items()}
    total = sum(r["bytes"] for r in ranks)
    result: dict[str, Any] = {
        "benchmark": "checkpoint",
        "mode": f"fsdp, {world} ranks (gloo, CPU)",
        "state_bytes": total,
        "bytes_per_rank": [r["bytes"] for r in ranks],
        "host_staging_bytes_per_rank": [r["staging_bytes"] for r in ranks],
        "repeats": args.repeats,
        "samples_per_rank": {r["rank"]: r["samples"] for r in ranks},
        "median_of_slowest_rank": med,
        "blocking_ratio": med["blocking_s"] / med["sync_dcp_save_s"],
        "blocking_vs_gathered_torch_save": med["blocking_s"] / med["gathered_torch_save_s"],
        "write_throughput_ratio": med["raw_write_s"] / med["write_s"],
        "write_GBps": total / med["write_s"] / 1e9,
        "write_vs_page_cache": med["write_s"] / med["page_cache_write_s"]
        if "page_cache_write_s" in med
        else None,
        "raw_write_GBps": total / med["raw_write_s"] / 1e9,
        "machine": {
            "cpus": os.cpu_count(),
            "threads_per_rank": max(1, (os.cpu_count() or 1) // world),
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    print(json.dumps(result, indent=2))
