"""``train.parallelism=fsdp``: the model, its gradients and its optimizer state sharded over the group's ranks
with torch's ``fully_shard`` (FSDP2).

How the sharded state survives, in this version:

- **Sharding** happens when a rank joins a group (:func:`shard`): the task's units (``Task.fsdp_units``,
  the built-in GPT's blocks) and then the whole model are sharded over the new group; the optimizer is built
  again over the sharded parameters and given the state the unsharded one had (a full, FQN-keyed state
  dict, each rank keeping its slice), the scheduler follows it.
- **Checkpoints** are written by every rank: each writes the shards it holds with DCP, and the driver
  commits one checkpoint listing every rank's files (:mod:`trainer.checkpoint.sharded`). DCP picks out
  what each reader needs on load, so an FSDP checkpoint resumes on any world size, on another family, or
  with DDP, and the other way round.
- **Loads** go into a fresh model (``WorkerState.before_load``): a peer's snapshot into the unsharded model,
  which the next join shards; a checkpoint likewise, except in a formed group (a run's start), where the
  fresh model is sharded first and each rank reads only its slices (``WorkerState.restore``). A group that lost a rank cannot gather its state any
  more (the lost rank held a slice of it), so its members hold nothing whole to hand over: recovery comes
  from every rank's copy of its own shards, which the driver holds (:mod:`trainer.shard_copy`,
  :mod:`trainer.cluster.shard_copies`), else from the newest checkpoint — never from a peer's snapshot.

- **Survival signals**: FSDP's gathers and reduce-scatters run through :mod:`trainer.sharding_comms`,
  which gives hang detection, straggler detection and the injected link faults what DDP's communication
  hook gives them (a rank waiting in a collective is marked so, compute time excludes that wait).

Not yet: a buddy copy of a rank's shards on another node (a lost node takes its ranks' copies along, and
the recovery then reads the checkpoint).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from trainer.api import Task
from trainer.sharding_comms import StepCollectives, watch

#: The module whose functions run torch.distributed's collectives (the frames a communication error passes).
_C10D = os.path.join("torch", "distributed", "distributed_c10d.py")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are sharded (DTensors of some group, possibly one that is gone)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    task: Task,
    dtype: torch.dtype,
    collectives: StepCollectives,
) -> tuple[torch.optim.Optimizer, Any | None]:
    """Shard the unsharded ``module`` over the current default group (in place) and return an optimizer and
    scheduler over its sharded parameters that carry on from ``optimizer`` and ``scheduler``. The units'
    collectives report to ``collectives`` (progress marks, compute time, injected link faults)."""
    # Unsharded: the full state, FQN-keyed. An optimizer without state (a fresh model, or one about to be
    # loaded) passes its groups' settings only: torch's state-dict helpers would first initialise the state
    # with a zero-gradient step, which builds the whole state on every rank and counts a step (AdamW's first
    # real step would then correct its moments as a second one).
    state = get_optimizer_state_dict(module, optimizer) if optimizer.state else None
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    schedule = scheduler.state_dict() if scheduler is not None else None
    # Parameters gathered in the run's precision, gradients reduced in fp32 (the optimizer's precision).
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for unit in task.fsdp_units(module):
        fully_shard(unit, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    watch(module, collectives)
    optimizer = task.build_optimizer(module)
    if state is not None:  # each rank keeps its slice of every full tensor: no communication
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        for group, settings in zip(optimizer.param_groups, groups, strict=True):
            group.update(settings)
    scheduler = task.build_scheduler(optimizer)
    if scheduler is not None and schedule is not None:
        scheduler.load_state_dict(schedule)
    return optimizer, scheduler


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every sharded one gathered whole (a collective: every rank calls it, with the same
    keys in the same order)."""
    return {k: t.full_tensor() if isinstance(t, DTensor) else t for k, t in tensors.items()}


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm computed over sharded gradients, as a plain tensor (the same on every rank)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def raised_in_collective(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a collective of torch.distributed (a peer gone, a connection closed): under
    FSDP the gathers run inside the task's forward, and such an error there is not the task's fault."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.endswith(_C10D):
            return True
        frame = frame.tb_next
    return False
