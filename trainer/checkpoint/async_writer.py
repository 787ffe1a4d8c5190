"""Asynchronous checkpoints: training is blocked only while the state is copied into CPU staging buffers.

The buffers (:class:`~trainer.checkpoint.staging.StagingBuffers`: one allocation, one copy of the state,
pinned when the state lives on an accelerator) are allocated once and reused, because a copy into existing
memory runs several times faster than one into a fresh allocation. Writing, digests and the atomic commit
then run on a background thread, and the deletion of old checkpoints after that. A new save first waits for
the previous one to finish, so commits never overlap and the staging buffers are never overwritten while
being written; :meth:`AsyncCheckpointer.stage` lends the same buffers to any other copy of the state (a
peer snapshot, a preemption save) on the same terms, so a worker needs one copy of its state in host memory
for all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.manager import CheckpointManager, TrainingProgress, write_failure
from trainer.checkpoint.objects import ObjectStore
from trainer.checkpoint.sharded import RankPart, SplitState, write_part
from trainer.checkpoint.staging import StagingBuffers
from trainer.checkpoint.state import PortableState
from trainer.devices import DeviceAdapter
from trainer.errors import CheckpointWriteError

log = logging.getLogger(__name__)


def set_thread_priority(priority: str) -> None:
    """Run the calling thread, and the threads it starts (the file writers, the uploads), at ``priority``.

    ``idle`` (Linux ``SCHED_IDLE``): the writer gets only CPU time no other thread of the host wants. Where
    training keeps every core busy, a write at normal priority takes its CPU time from the training threads
    (and an intra-op thread held up stalls the others at their next barrier); at idle priority it fills the
    gaps of the step instead, and takes longer. A save the run waits for (the next save, the final one, a
    preemption's) gets the cores training leaves while it waits."""
    if priority == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class AsyncCheckpointer:
    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="checkpoint-writer",
            initializer=set_thread_priority,
            initargs=(manager.writer_priority,),
        )
        #: The pending write: a whole checkpoint's (its path) or one rank's part of a sharded one.
        self._pending: Future[Any] | None = None
        self._retaining: Future[None] | None = None
        #: The host copy of the state that every save (and :meth:`stage`) reuses.
        self.staging = StagingBuffers()
        self._lock = threading.Lock()
        #: Seconds the caller was blocked by the most recent :meth:`save` (waiting + copying).
        self.last_blocking_s = 0.0
        #: Background saves that could not be written, oldest first (reported, not raised, by save()).
        self.failures: list[CheckpointWriteError] = []

    def save(
        self,
        state: PortableState,
        rng_states: dict[str, torch.Tensor],
        adapter: DeviceAdapter,
        progress: TrainingProgress,
        config: dict[str, Any],
        overlap: torch.optim.Optimizer | None = None,
    ) -> Future[Path | str]:
        """Stage the state and write it in the background; the future yields the committed directory.
        ``overlap``: the optimizer stepping this state, whose parameters' and state's copies may then run
        alongside training until its next step (on CUDA; see :mod:`~trainer.checkpoint.staging`).

        A previous save that failed to write (:class:`CheckpointWriteError`, e.g. a full disk) does not stop
        this one: it is kept in :attr:`failures` for the caller to report. Other errors are raised.
        """
        started = time.perf_counter()
        self._finish_previous()
        staged = self._stage(state.tensors, overlap)
        staged_state = PortableState(staged, state.optimizer, state.scaler, state.task_state)
        rng = {k: v.clone() for k, v in rng_states.items()}
        snapshot = TrainingProgress(
            progress.step,
            progress.samples_seen,
            progress.world_size,
            progress.seed,
            list(progress.history),
            dict(progress.metrics),
        )
        pending = self._pool.submit(self._write, staged_state, rng, adapter, snapshot, config)
        # The old checkpoints go after this one is reported committed, on the same thread.
        self._retaining = self._pool.submit(self._retain_after, pending)
        self._pending = pending
        self.last_blocking_s = time.perf_counter() - started
        return pending

    def _finish_previous(self) -> None:
        """Wait for the pending save; one that could not be written is kept in :attr:`failures`."""
        try:
            self.wait()
        except CheckpointWriteError as exc:
            log.error("%s", exc)
            self.failures.append(exc)

    def _write(self, *args: Any) -> Path | str:
        self.staging.wait_copied()  # the non-blocking copies land before the writer reads them
        return self.manager.save(*args, retain=False)

    def save_part(
        self,
        directory: Path | str,
        rank: int,
        state: SplitState,
        rng_key: str,
        rng_states: dict[str, torch.Tensor],
        overlap: torch.optim.Optimizer | None = None,
    ) -> Future[RankPart]:
        """Stage this rank's share of a sharded checkpoint and write it into ``directory`` in the background
        (see :mod:`~trainer.checkpoint.sharded`): the checkpoint's private directory, or on object storage its
        URL (``store.reserve``; the files are written locally, then uploaded). The future yields the
        :class:`RankPart` for the committing party, or raises :class:`CheckpointWriteError`. Nothing is
        committed here. ``overlap``: as for :meth:`save` (the local shards the optimizer steps)."""
        started = time.perf_counter()
        self._finish_previous()
        staged = self._stage(state.tensors, overlap)
        rng = {k: v.clone() for k, v in rng_states.items()}
        pending = self._pool.submit(
            self._write_part, directory, rank, SplitState(staged, dict(state.placements)), rng_key, rng
        )
        self._pending, self._retaining = pending, None
        self.last_blocking_s = time.perf_counter() - started
        return pending

    def _write_part(
        self, directory: Path | str, rank: int, state: SplitState, rng_key: str, rng: dict[str, torch.Tensor]
    ) -> RankPart:
        try:
            self.staging.wait_copied()
            store = self.manager.store
            if not isinstance(store, ObjectStore):
                return write_part(Path(directory), rank, state, rng_key, rng, direct=self.manager.direct_io)
            local = store.scratch()
            try:
                part = write_part(local, rank, state, rng_key, rng, sync=False)
                store.upload(local, store.name_of(directory), sorted(part.files))
            finally:
                shutil.rmtree(local, ignore_errors=True)
            return part
        except BaseException as exc:
            cause = write_failure(exc)
            if cause is None:
                raise
            raise CheckpointWriteError(
                f"rank {rank} could not write its shards into {directory}: {cause}; nothing was committed"
            ) from exc

    def _retain_after(self, save: Future[Path | str]) -> None:
        if save.exception() is None:
            self.manager.retain(save.result())

    def _stage(
        self, tensors: dict[str, torch.Tensor], overlap: torch.optim.Optimizer | None = None
    ) -> dict[str, torch.Tensor]:
        """Issue the copies; the host waits for them only where it reads them (``wait_copied``). Devices
        other than CUDA, whose copies carry no events here, are synchronised now."""
        with self._lock:
            staged = self.staging.copy(tensors, overlap)
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        if device.type not in ("cpu", "cuda"):
            torch.get_device_module(device.type).synchronize(device)
        return staged

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``tensors`` into the staging buffers once the pending save is done with them, and return
        the staged CPU copies, valid until the next :meth:`save` or :meth:`stage` (for a copy of the state
        that is consumed before then, e.g. a peer snapshot handed to Ray's object store, which copies it).
        The pending save's outcome is left for :meth:`wait` to report: one that could not be written does
        not fail the copy, and is not lost to the caller who asks for it."""
        if self._pending is not None:
            futures.wait([self._pending])
        staged = self._stage(tensors)
        self.staging.wait_copied()
        return staged

    def writer_policy(self) -> int:
        """The scheduling policy the writer's thread runs under (``os.SCHED_OTHER``, ``os.SCHED_IDLE``)."""
        return int(self._pool.submit(os.sched_getscheduler, 0).result())

    @property
    def busy(self) -> bool:
        """Whether a save (its write, commit or the deletion of old checkpoints after it) is still running."""
        return any(f is not None and not f.done() for f in (self._pending, self._retaining))

    @property
    def staged_bytes(self) -> int:
        """Bytes of tensor state in the staging buffers (the last save's size)."""
        return sum(t.numel() * t.element_size() for t in self.staging.tensors.values())

    def wait(self) -> Any:
        """Block until the pending save (if any) has committed and old checkpoints are deleted; re-raise
        the save's error. Returns its committed path (a rank's :class:`RankPart` for :meth:`save_part`)."""
        pending, self._pending = self._pending, None
        retaining, self._retaining = self._retaining, None
        try:
            return None if pending is None else pending.result()
        finally:
            if retaining is not None:
                retaining.result()

    def close(self) -> Any:
        """Finish the pending save and stop the writer thread."""
        try:
            return self.wait()
        finally:
            self._pool.shutdown(wait=True)
