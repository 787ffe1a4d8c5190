"""The survival signals of a sharded step (``train.parallelism=fsdp``): progress marks, compute time and
injected link faults, taken from FSDP's own collectives.

Under DDP they come from a callback the step's backward queues (``Worker._entering_collective``): it runs
where DDP's backward starts to wait for its gradient all-reduce, and that ends the rank's compute. Under
FSDP the first collective of a step is the forward's all-gather, so "time to the first collective" says
nothing; a step is instead a sequence of gathers (forward, and backward for the units resharded after
forward) and reduce-scatters (backward), with compute in between. Here:

- **phase**: "collective" while the rank is blocked in one of FSDP's collective calls (including its wait),
  "compute" otherwise, each change a fresh progress mark. A rank waiting in an all-gather for a peer that is
  stuck is thus "in a collective" and not taken for hung (``trainer.cluster.watch``); the stuck peer is;
- **compute time** of a step: the step's time less the time blocked in those calls, which feeds straggler
  detection (a slow rank's peers wait for it inside the collectives, so their compute time stays their own);
- **injected link faults**: ``WorkerFaults.in_collective`` runs on entering each call, so the family's
  delay and error rate apply per collective (a step of a model sharded in k units makes about 3k calls with
  FSDP's default resharding after forward), and a hang "in a collective" stops inside the step's first one.

Only collectives inside a train step carry these signals: an evaluation or a capture outside a step gathers
too, untouched, as DDP's evaluation (which bypasses the DDP wrapper) is.

Why FSDP's custom collectives (``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``) rather
than module hooks: a module's forward hooks bracket its compute as well as its gather, and in backward the
gathers and reduce-scatters run from FSDP's autograd hooks, which no module hook brackets; the custom
collective is the very call that blocks. The classes here delegate to FSDP's default ones, so the
communication and its numerics are unchanged. FSDP calls them with ``async_op=False`` (the framework never
sets ``unshard_async_op``); on gloo (CPU, the simulated families) c10d then waits for the work inside the
call, so the time in the call is the time blocked. Should a caller ask for ``async_op=True``, the work is
waited for inside the call too (FSDP's own later ``wait()`` returns at once), so the time is still counted.

Not covered, and why: on a device backend (NCCL, HCCL) a collective called without ``async_op`` is queued
on a stream and the call returns before the data moves, so the host is hardly ever "in" it: a wait for a
peer then shows at the next host synchronisation (the non-finite check, the loss read at a chunk's end),
counted as compute. Measuring it there needs device events; untested here (no such hardware). The gradient
norm's all-reduce (a DTensor operation in the optimizer step, not one of FSDP's collectives) counts as
compute too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

# FSDP's interface for custom collectives and its default implementations (documented by
# ``FSDPModule.set_custom_all_gather``, defined in private modules in torch 2.13).
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

if TYPE_CHECKING:
    from trainer.faults import WorkerFaults


class Rank(Protocol):
    """What the signals read and set on the worker whose collectives they watch."""

    step: int
    progress: dict[str, Any]
    faults: WorkerFaults
    #: Set when a framework collective fails: an error in the step is then not the user's.
    collective_failed: bool

    def mark(self, phase: str) -> None: ...


class StepCollectives:
    """The time one rank's train step spends blocked in FSDP's collectives, with the phase marks and the
    injected faults that go with each call. One per worker; the worker calls :meth:`begin_step` when a step
    begins and reads :meth:`compute_s` when it ends."""

    def __init__(self, rank: Rank) -> None:
        self.rank = rank
        #: Seconds the current (or last) step spent blocked in collectives.
        self.blocked_s = 0.0

    def begin_step(self) -> None:
        """At the start of a train step, once the worker has marked it "compute"."""
        self.blocked_s = 0.0

    def compute_s(self, step_s: float) -> float:
        """The compute time of a step that took ``step_s`` seconds: the time not blocked in a collective."""
        return step_s - self.blocked_s

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Around one collective call and its wait. Inside a train step (phase "compute"): mark the rank "in a
        collective", inject the family's link faults, count the seconds, then mark it computing again; a
        failure is flagged as the framework's. Outside a step: the call runs untouched."""
        rank = self.rank
        if rank.progress.get("phase") != "compute":
            yield
            return
        rank.mark("collective")
        start = time.perf_counter()
        try:
            # Inside the collective: an injected delay counts as time blocked, an injected hang stops here.
            rank.faults.in_collective(rank)
            yield
        except Exception:
            rank.collective_failed = True
            raise
        finally:
            self.blocked_s += time.perf_counter() - start
        rank.mark("compute")


def _waited(work: dist.Work | None) -> dist.Work | None:
    """``work`` finished (a no-op when the collective was synchronous and returned none)."""
    if work is not None:
        work.wait()
    return work


class _Watched:
    """What both wrappers share: the step's collectives they report to, and FSDP's default collective they
    hand each call to (its buffers allocated as FSDP's own)."""

    def __init__(self, collectives: StepCollectives, default: Any) -> None:
        self.collectives = collectives
        self.default = default

    def allocate(
        self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return self.default.allocate(size, dtype=dtype, device=device)


class WatchedAllGather(_Watched, AllGather):
    """FSDP's default all-gather, run inside :meth:`StepCollectives.blocked`."""

    def __init__(self, collectives: StepCollectives) -> None:
        super().__init__(collectives, DefaultAllGather())

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        with self.collectives.blocked():
            return _waited(self.default(output_tensor, input_tensor, group, async_op))


class WatchedReduceScatter(_Watched, ReduceScatter):
    """FSDP's default reduce-scatter, run inside :meth:`StepCollectives.blocked`."""

    def __init__(self, collectives: StepCollectives) -> None:
        super().__init__(collectives, DefaultReduceScatter())

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work | None:
        with self.collectives.blocked():
            return _waited(self.default(output_tensor, input_tensor, group, op, async_op))


def watch(module: nn.Module, collectives: StepCollectives) -> int:
    """Route the collectives of every FSDP unit in ``module`` (sharded already) through ``collectives``;
    returns how many units were set up."""
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_custom_all_gather(WatchedAllGather(collectives))
        unit.set_custom_reduce_scatter(WatchedReduceScatter(collectives))
    return len(units)
