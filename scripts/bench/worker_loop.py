"""The toolkit's step without Ray and the driver: ``overhead.py --in-process`` runs each rank's
:class:`trainer.worker.Worker` in a spawned process joined by gloo — set up, attached, ``train_step`` on a
thread of its own as a Ray rank's training thread runs it, the losses read from the device once per chunk —
against the plain loop. What it leaves out of the toolkit (Ray's actor calls, the driver, heartbeats, the
journal, the exporter) is what separates its figure from the Ray run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from plain_task_loop import (  # this script's directory: on the path when the script runs
    put_steady,
    steady_start,
)

from trainer.config import Config
from trainer.threads import on_passing_thread
from trainer.worker import Worker, host_values


@dataclass(frozen=True)
class WorkerRun:
    """What each rank trains (the toolkit run's config), its warm-up steps and the steps per chunk."""

    config: Config
    warmup_steps: int
    chunk: int


def worker_rank(rank: int, world: int, port: int, run: WorkerRun, out: Any) -> None:
    """One rank (a ``spawned_step_s`` target); rank 0 puts the steady-state seconds per step on ``out``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    worker = Worker(run.config, rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    on_passing_thread(worker.setup)
    worker.attach(rank, world)
    total = run.config.train.steps

    def steps() -> None:
        losses: list[torch.Tensor] = []
        start = steady_start()
        for step in range(total):
            if step == run.warmup_steps:
                start = steady_start()
            losses.append(worker.train_step().loss)
            if len(losses) == run.chunk:
                host_values(losses)
                losses = []
        if rank == 0:
            put_steady(out, start, total - run.warmup_steps)

    on_passing_thread(steps)
    dist.destroy_process_group()
