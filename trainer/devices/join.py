"""Joining a process group on a device family's backend, with the backend timeouts of :mod:`trainer.devices.timeouts`."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from trainer.devices.base import DeviceAdapter
from trainer.devices.timeouts import BackendTimeouts, apply


def join_group(
    adapter: DeviceAdapter,
    timeout_s: float,
    *,
    store: dist.Store | None = None,
    rank: int = -1,
    world_size: int = -1,
) -> BackendTimeouts:
    """Create this process's default group on ``adapter``'s backend with the backend timeouts derived from
    ``timeout_s``: the environment first, then ``init_process_group`` (through ``store``, else ``env://``).
    Returns what was applied, for the journal."""
    timeouts = adapter.backend_timeouts(timeout_s)
    apply(timeouts)
    timeout = timedelta(seconds=timeouts.process_group_s)
    backend = adapter.distributed_backend()
    if store is None:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return timeouts
