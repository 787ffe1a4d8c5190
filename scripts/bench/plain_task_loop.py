"""A :class:`trainer.api.Task` trained in a plain torch DDP loop: what a user without the toolkit would write
around the same hooks. ``overhead.py --example`` times it against the toolkit running the same task.

The loop calls the task's code and nothing else of the toolkit: ``build_model`` / ``build_optimizer`` /
``build_scheduler``, the data read from ``train_dataset`` with ``collate``, then ``loss`` with backward, the
gradient clipping, the optimizer and scheduler steps, or the task's own ``train_step`` given a
:class:`PlainControl`. Nothing here journals, marks progress, snapshots or checks gradients for finiteness:
that work is exactly what the comparison charges to the toolkit.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.api import Task


@dataclass(frozen=True)
class PlainRun:
    """What the plain loop trains and for how long; picklable, sent to each spawned rank."""

    target: str  # "package.module.TaskClass"
    task_args: dict[str, Any] = field(default_factory=dict)
    global_batch: int = 16
    steps: int = 120
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0


class PlainControl:
    """The :class:`trainer.api.StepControl` a plain loop gives a task's ``train_step``: backward is
    ``loss.backward()``; the optimizer step clips, steps the optimizer, then the scheduler."""

    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, clip: float
    ) -> None:
        self.module, self.optimizer, self.scheduler, self.clip = module, optimizer, scheduler, clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def local_batches(
    dataset: Any, collate: Callable[[list[Any]], Any], run: PlainRun, rank: int, world: int
) -> Iterator[Any]:
    """This rank's batch of every step: the epoch's permutation (seeded by the epoch) cut into global
    batches, each rank taking its contiguous slice, the samples built with the task's ``collate``. A global
    batch that runs past the end of an epoch continues in the next one's permutation."""
    length, local = len(dataset), run.global_batch // world
    epoch, perm = -1, torch.empty(0, dtype=torch.int64)
    step = 0
    while True:
        start = step * run.global_batch + rank * local
        items = []
        for index in range(start, start + local):
            e, offset = divmod(index, length)
            if e != epoch:
                epoch, perm = e, torch.randperm(length, generator=torch.Generator().manual_seed(run.seed + e))
            items.append(int(perm[offset]))
        yield collate([dataset[i] for i in items])
        step += 1


def build_task(run: PlainRun) -> Task:
    module, _, name = run.target.rpartition(".")
    task: Task = getattr(importlib.import_module(module), name)(**run.task_args)
    return task


def plain_worker(rank: int, world: int, port: int, run: PlainRun, out: Any) -> None:
    """One rank of the plain loop (a ``torch.multiprocessing`` target). Rank 0 puts the steady-state seconds
    per step — wall time of the steps after ``run.warmup_steps`` ÷ their count — on ``out``."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))  # as the toolkit's workers do
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    task = build_task(run)
    torch.manual_seed(run.seed)
    module = task.build_model(torch.device("cpu"))
    model = nn.parallel.DistributedDataParallel(module)
    optimizer = task.build_optimizer(module)
    control = PlainControl(module, optimizer, task.build_scheduler(optimizer), run.grad_clip)
    manual = type(task).train_step is not Task.train_step
    batches = local_batches(task.train_dataset(), task.collate, run, rank, world)
    model.train()
    start = steady_start()
    for step in range(run.steps):
        if step == run.warmup_steps:
            start = steady_start()
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        if manual:
            loss = task.train_step(model, batch, control)
        else:
            loss = task.loss(model, batch)
            control.backward(loss)
            control.optimizer_step()
        loss.item()
    if rank == 0:
        put_steady(out, start, run.steps - run.warmup_steps)
    dist.destroy_process_group()


def steady_start() -> tuple[float, float]:
    """The start of a steady window: ``time.perf_counter()`` to time its steps, ``time.time()`` to place it
    among the CPU sampler's samples."""
    return time.perf_counter(), time.time()


def put_steady(out: Any, start: tuple[float, float], steps: int) -> None:
    """Rank 0's report to :func:`spawned_step_s`: the seconds per step of the ``steps`` since ``start``
    (:func:`steady_start`), and the window's start and end in epoch seconds."""
    out.put(((time.perf_counter() - start[0]) / steps, (start[1], time.time())))


def plain_step_s(run: PlainRun, port: int, world: int = 2) -> tuple[float, tuple[float, float]]:
    """Steady-state seconds per step of ``run`` on ``world`` spawned gloo processes, and that steady
    window's start and end (epoch seconds)."""
    return spawned_step_s(plain_worker, run, port, world)


def is_spawned_rank(cmdline: str) -> bool:
    """A process that :func:`spawned_step_s` started (``multiprocessing``'s spawn start method)."""
    return "spawn_main" in cmdline


def spawned_step_s(
    target: Callable[..., None], payload: Any, port: int, world: int
) -> tuple[float, tuple[float, float]]:
    """Start ``target(rank, world, port, payload, out)`` on ``world`` spawned processes; what rank 0 puts on
    ``out``: the seconds per step, and the steady window (epoch seconds at its start and end)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, payload, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        step_s, (start, end) = out.get(timeout=600)
        return float(step_s), (float(start), float(end))
    finally:
        for p in procs:
            p.join(timeout=60)
        for p in procs:  # a rank still in its process group's teardown: its figure is in, it is not needed
            if p.is_alive():
                print(
                    f"plain rank process {p.pid} still running after its figure came in: terminated",
                    file=sys.stderr,
                )
                p.terminate()
                p.join(timeout=10)
