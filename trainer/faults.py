"""Fault injection for tests and demos, driven by the ``faults`` config group. Off by default.

Injected faults act on the real mechanisms: a killed worker is a SIGKILLed process, a flaky interconnect
is the worker's DDP communication hook or FSDP's collectives (``trainer.sharding_comms``), and the probes,
delaying or failing real collectives, a hang is a process that stops making progress, a wrong-computing
device corrupts a real matmul result.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from trainer.checkpoint.async_writer import AsyncCheckpointer
    from trainer.config import Config


class Worker(Protocol):
    """What the fault seams read of the worker they act on: how many steps it has done."""

    step: int


class InjectedCollectiveError(RuntimeError):
    """A collective failed because the fault profile said so (looks like a transport error to callers)."""


@dataclass(frozen=True)
class CollectiveFaults:
    """How one family's interconnect misbehaves, as seen by one rank."""

    rank: int = 0
    #: Seconds added to every collective on every rank (a slow fabric).
    delay_s: float = 0.0
    #: Additional seconds for collectives that touch these ranks (a slow link or NIC).
    slow_ranks: tuple[int, ...] = ()
    slow_rank_delay_s: float = 0.0
    #: Probability that a collective raises :class:`InjectedCollectiveError` (a flaky link).
    error_rate: float = 0.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.delay_s > 0 or self.error_rate > 0 or bool(self.slow_ranks and self.slow_rank_delay_s > 0)

    def rng(self, salt: int = 0) -> random.Random:
        """The draw deciding injected errors. Not seeded by rank: every rank fails the same collective,
        as when a link drops for the whole group — a rank failing alone would leave its peers blocked in
        that collective, which is the hang case, injected separately."""
        return random.Random(hash((self.seed, salt)))

    def before_collective(self, rng: random.Random, peers: tuple[int, ...] | None = None) -> None:
        """Sleep and/or raise as configured; ``peers`` limits the slow-rank delay to links touching them."""
        delay = self.delay_s
        touched = set(peers) if peers is not None else {self.rank}
        if self.slow_ranks and touched & set(self.slow_ranks):
            delay += self.slow_rank_delay_s
        if delay > 0:
            time.sleep(delay)
        if self.error_rate > 0 and rng.random() < self.error_rate:
            raise InjectedCollectiveError(
                f"injected collective failure on rank {self.rank} (flaky interconnect)"
            )


class WorkerFaults:
    """The faults one worker injects, installed on it from outside the training code (the worker group sets
    :attr:`Worker.faults` when a worker joins; a worker alone has :data:`NO_FAULTS`). The worker calls two
    seams: :meth:`before_step` once its step has begun (a kill, a hang, a slow device) and
    :meth:`in_collective` on entering each collective of its step (a hang there, a slow or flaky link): under
    DDP once a step, where its backward starts to wait for the gradient all-reduce (and at the one re-layout
    of DDP's buckets per incarnation, before a forward); each all-gather and reduce-scatter under FSDP. The
    worker actor calls two more around its saves (:meth:`before_save`, :meth:`after_part_written`: a kill
    mid-checkpoint).

    ``armed``: the kill, hang and straggler faults may fire — the run's first incarnation only, so that a
    replacement is healthy. A family's interconnect faults act on every incarnation alike.
    """

    def __init__(self, config: Config, family: str, rank: int, step: int, armed: bool) -> None:
        self.faults, self.rank, self.armed = config.faults, rank, armed
        self.family = config.faults.for_family(family)
        self.injected = family in config.faults.families
        slow = armed and self.family.straggler_rank == rank
        #: Seconds this worker's device takes longer per step (an injected straggler).
        self.straggler_s = self.family.straggler_delay_s if slow else 0.0
        #: The step whose gradient collective this worker gets stuck in (an injected hang), if any.
        self.hang_in_collective_at: int | None = None
        #: This worker's device computes wrong results (caught by the device probe).
        self.wrong_compute = armed and self.family.wrong_compute_rank == rank
        self._rng = self.collective(step).rng(salt=config.train.seed)

    def collective(self, step: int) -> CollectiveFaults:
        """The family's interconnect faults as they stand after ``step`` steps (they may begin mid-run)."""
        f = self.family
        if step + 1 < f.degrade_from_step:
            return CollectiveFaults(rank=self.rank)
        return CollectiveFaults(
            rank=self.rank,
            delay_s=f.collective_delay_s,
            slow_ranks=(f.slow_rank,) if f.slow_rank is not None else (),
            slow_rank_delay_s=f.slow_rank_delay_s,
            error_rate=f.collective_error_rate,
            seed=self.faults.seed,
        )

    def before_step(self, worker: Worker) -> None:
        """At the start of ``worker``'s next step (its progress already marks it computing)."""
        if not self.armed:
            return
        step, faults = worker.step + 1, self.faults
        if step == faults.kill_at_step and self.rank in faults.killed_ranks():
            # This process vanishes mid-run (SIGKILL), or is asked to leave (SIGTERM).
            os.kill(os.getpid(), signal.Signals[faults.kill_signal])
        if faults.hang_rank == self.rank and step == faults.hang_at_step:
            if faults.hang_phase == "collective":
                self.hang_in_collective_at = step  # in_collective stops there
            else:
                while True:  # alive, holding its resources, making no progress
                    time.sleep(1.0)
        if self.straggler_s > 0:
            time.sleep(self.straggler_s)  # this device computes slowly

    def before_save(self, step: int, checkpointer: AsyncCheckpointer) -> None:
        """Before a replicated checkpoint of ``step`` is staged: the injected kill before its commit
        (``faults.kill_during_checkpoint_step``), the checkpoint left written aside."""
        if self.armed and self.faults.kill_during_checkpoint_step == step:
            die_before_commit(checkpointer)

    def after_part_written(self, step: int) -> None:
        """This rank's part of a sharded checkpoint of ``step`` is written: the same fault kills rank 0
        before it reports the part, which is never committed."""
        if self.armed and self.faults.kill_during_checkpoint_step == step and self.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def in_collective(self, worker: Worker) -> None:
        """On entering one of the framework's collectives in ``worker``'s current step (called for each: the
        family's delay and error rate apply per collective call)."""
        if self.hang_in_collective_at == worker.step + 1:
            while True:  # stuck inside the collective: the peers wait in it too
                time.sleep(1.0)
        if self.injected:
            faults = self.collective(worker.step)
            if faults.active:
                faults.before_collective(self._rng)


class _NoFaults(WorkerFaults):
    """A healthy worker's faults: none."""

    def __init__(self) -> None:
        self.straggler_s, self.hang_in_collective_at, self.wrong_compute = 0.0, None, False

    def collective(self, step: int) -> CollectiveFaults:
        return CollectiveFaults()

    def before_step(self, worker: Worker) -> None:
        pass

    def in_collective(self, worker: Worker) -> None:
        pass

    def before_save(self, step: int, checkpointer: AsyncCheckpointer) -> None:
        pass

    def after_part_written(self, step: int) -> None:
        pass


#: What a worker injects unless its group installs :class:`WorkerFaults`: nothing.
NO_FAULTS: WorkerFaults = _NoFaults()


def corrupt_matmul(result: torch.Tensor) -> torch.Tensor:
    """What a silently-corrupting device returns: a few elements off by a large amount."""
    bad = result.clone()
    flat = bad.view(-1)
    flat[:: max(1, flat.numel() // 7)] += 1.0e3
    return bad


@dataclass(frozen=True)
class BitFlip:
    """Silent data corruption as fleets report it: one bit of one element of a result flipped.

    ``element`` indexes the flattened result; ``bit`` counts from the least significant bit of the element's
    IEEE encoding (for float32: 0-22 mantissa, 23-30 exponent, 31 sign).
    """

    element: int = 0
    bit: int = 0

    def apply(self, result: torch.Tensor) -> torch.Tensor:
        """A copy of ``result`` with the bit flipped; ``result`` itself is left alone."""
        width = result.element_size() * 8
        if result.element_size() not in _SAME_WIDTH_INT:
            raise ValueError(f"BitFlip: no integer view for {result.dtype}")
        if not 0 <= self.bit < width:
            raise ValueError(f"BitFlip.bit={self.bit}: allowed: 0..{width - 1} for {result.dtype}")
        if not 0 <= self.element < result.numel():
            raise ValueError(f"BitFlip.element={self.element}: allowed: 0..{result.numel() - 1}")
        bad = result.clone().contiguous()
        words = bad.view(-1).view(_SAME_WIDTH_INT[result.element_size()])
        # The top bit of a signed integer view is its sign: as a Python int, that mask is negative.
        mask = 1 << self.bit if self.bit < width - 1 else -(1 << self.bit)
        words[self.element] ^= mask
        return bad


_SAME_WIDTH_INT: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def corrupt_newest_checkpoint(root: Path) -> Path | None:
    """Flip one byte in the middle of the newest committed checkpoint's largest file; returns that file."""
    from trainer.checkpoint.store import CheckpointStore

    committed = CheckpointStore(root).committed()
    if not committed:
        return None
    files = [p for p in committed[-1].rglob("*") if p.is_file() and p.name != "manifest.json"]
    target = max(files, key=lambda p: p.stat().st_size)
    with open(target, "r+b") as f:
        f.seek(target.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return target


_Call = TypeVar("_Call", bound=Callable[..., Any])


def dies_in_call(method: _Call) -> _Call:
    """A worker call an injected fault may kill the worker in (``faults.families.<family>.die_in_call``): the
    process vanishes inside the call when the worker's ``die_in`` names it."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.die_in == method.__name__:
            os.kill(os.getpid(), signal.SIGKILL)
        return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


def die_before_commit(checkpointer: AsyncCheckpointer) -> None:
    """Injected fault (``faults.kill_during_checkpoint_step``): the writer thread kills this process with the
    checkpoint written aside, before its commit."""
    store = checkpointer.manager.store

    def commit(tmp: Path, manifest: Any) -> Path:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    store.commit = commit  # type: ignore[method-assign]
