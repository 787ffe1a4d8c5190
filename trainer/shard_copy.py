"""A rank's copy of its own shards (``train.parallelism=fsdp``): what recovers a lost rank without the disk.

Under FSDP no rank holds the training state whole, and a group that lost a rank cannot gather it any more,
so a peer's whole-state snapshot (DDP's way back) does not exist. Instead every rank hands the driver, at a
chunk end, a host copy of the state it holds itself (:func:`take`): the local tensors of its sharded
parameters and optimizer state, the replicated tensors (buffers, the task's extra tensors), and the
non-tensor state the rank needs to go on (step, samples seen, optimizer param groups, scheduler, GradScaler,
the task's extra JSON values with the non-finite-step state, history, last loss, and the rank's RNG state).
The driver keeps one complete set (every rank, one step, one world size) through Ray's object store
(:mod:`trainer.cluster.shard_copies`).

A group re-formed at the same world size lays every tensor out exactly as before (the same ranks, the same
units, the same shapes), so rank ``r`` of the new group takes the local tensors of rank ``r``'s copy as its
own (:func:`rebuild`: DTensors of the new group around them) — no collective, no disk, bit for bit the state
rank ``r`` had. Another world size cannot use the copies (the slices differ): that goes through a checkpoint.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from trainer.errors import CheckpointIncompatibleError

#: The key that tells a shard copy from a whole-state snapshot (``WorkerState.snapshot``).
KIND = "shard_copy"


def take(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of this rank's part of ``tensors`` (the live state, DTensors not gathered): the local
    shard of every DTensor, every plain tensor whole. Taken now: training may go on once this returns."""
    return {
        key: (t.to_local() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)
        for key, t in tensors.items()
    }


def rebuild(local: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state to load into the live model: for each tensor of ``like`` (the live group's layout, see
    ``portable.template``), a DTensor of the live group around the copied local shard, or the copied plain
    tensor. Raises naming the keys when the copy does not fit (another model, another world size)."""
    missing, unexpected = sorted(set(like) - set(local)), sorted(set(local) - set(like))
    reshaped = [
        f"{k}: copy {list(local[k].shape)} vs live {list(_local_shape(t))}"
        for k, t in like.items()
        if k in local and tuple(local[k].shape) != _local_shape(t)
    ]
    if missing or unexpected or reshaped:
        raise CheckpointIncompatibleError(
            f"the shard copy does not fit this rank's state: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, reshaped {reshaped[:4]}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, t in like.items():
        if isinstance(t, DTensor):
            shard = local[key].to(t.to_local().device)
            out[key] = DTensor.from_local(
                shard, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        else:
            out[key] = local[key]
    return out


def _local_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple((t.to_local() if isinstance(t, DTensor) else t).shape)
