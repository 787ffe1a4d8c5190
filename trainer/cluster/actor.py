"""The Ray actor hosting one rank (or a warm spare): a :class:`~trainer.worker.Worker` plus group plumbing.

Construction builds the model and optimizer, so a spare is ready to take a rank in the time it takes to
join a process group and adopt a peer's snapshot. Every method returns plain data; errors inside a
collective (a peer vanished) come back as a result with ``ok=False`` rather than as an exception, so the
controller can tell a dead worker (the call raises) from one that merely noticed it.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.lease import Fence
from trainer.checkpoint.sharded import RankPart
from trainer.cluster.leaving import watch_terminate
from trainer.cluster.saves import shards_per_rank
from trainer.cluster.stretch import Stretch
from trainer.config import from_container
from trainer.devices.group_sockets import GroupSockets
from trainer.devices.join import join_group
from trainer.devices.sim import SIM_VISIBLE_DEVICES_ENV
from trainer.errors import CheckpointWriteError, UserCodeError
from trainer.faults import WorkerFaults, dies_in_call
from trainer.sharding import is_sharded
from trainer.threads import on_passing_thread, passing_thread
from trainer.worker import Worker


def run_or_leave(body: Callable[[], None], leave: Callable[[], None]) -> str | None:
    """Run ``body``; if a collective in it fails, call ``leave`` and return the error, else None.

    A :class:`UserCodeError` also leaves, then is raised again. ``leave`` runs after the exception is
    handled, never inside the handler: while it is being handled, its traceback keeps the frames of the
    failed collective alive, and with them the process group, whose connections then stay open — a peer
    waiting on this rank alone is not released until this process exits (seen with 3 gloo ranks: one
    dies, another waits in a broadcast from a survivor that left inside its handler).
    """
    user_error: UserCodeError | None = None
    try:
        body()
        return None
    except (RuntimeError, dist.DistBackendError) as exc:
        failure = f"{type(exc).__name__}: {exc}"[:500]
    except UserCodeError as exc:
        # Its message carries the formatted traceback; the frames themselves (and the exception it was
        # raised while handling) must not outlive the handler.
        user_error = exc.with_traceback(None)
        user_error.__context__ = user_error.__cause__ = None
        failure = ""
    leave()
    if user_error is not None:
        raise user_error
    return failure


def _node_id() -> str | None:
    """The Ray node this process runs on; None outside Ray (a group of one never imports it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().get_node_id())


class WorkerActor:
    def __init__(
        self,
        config: dict[str, Any],
        workers_per_node: int,
        die_in: str | None = None,
        simulated_device: int | None = None,
        own_process: bool = True,
    ) -> None:
        """``die_in``: the name of a call this worker dies in (injected fault; None for healthy workers).
        ``simulated_device``: the device of a simulated family this worker stands on (its bundle), made
        visible as Ray makes a GPU visible (CUDA_VISIBLE_DEVICES) to a CUDA worker. ``own_process``: this
        worker has its process to itself (a Ray actor's: its objects are frozen, its SIGTERM watched); False
        for the one member of a group of one, in the driver's process (:mod:`trainer.cluster.one_process`),
        whose SIGTERM is the driver's preemption."""
        if simulated_device is not None:
            os.environ[SIM_VISIBLE_DEVICES_ENV] = str(simulated_device)
        self.config = from_container(config)
        self.own_process = own_process
        # Objects that live as long as the process go out of the cyclic collector's sight (gc.freeze), so that
        # leave()'s collections scan only what was made since (the DDP wrapper, a failed collective's
        # objects). A full collection costs ~0.2 s of a core here, and in a release cascade each rank waits
        # for its neighbour's leave(): with 8 ranks sharing two cores the last survivor was out 2.2 s after
        # the kill, against 0.16 s frozen. First what the imports made, then the model and optimizer — except
        # under FSDP, whose model refers to itself through its hooks and is built anew at each re-formation:
        # a frozen one would never be collected. (Not in the driver's process: its objects are not ours.)
        if own_process:
            gc.collect()
            gc.freeze()
        self.worker = Worker(self.config, local_world_size=workers_per_node)
        on_passing_thread(self.worker.setup)  # not on a thread that outlives it (trainer.threads)
        if own_process and not self.config.train.sharded:
            gc.collect()
            gc.freeze()
        #: The connections of the group this worker is in (none before its first join).
        self.sockets = GroupSockets()
        #: This rank's training, on a thread of its own (:meth:`train`).
        self.stretch = Stretch(self.worker, lambda body: run_or_leave(body, self.leave))
        self.die_in = die_in
        #: Whether this worker holds the run's state (restored or loaded); a fresh spare does not.
        self.holds_state = False
        #: Held while the state is replaced (restore, load_snapshot): info() answers after, not during.
        self.loading = threading.Lock()
        self.checkpointer: AsyncCheckpointer | None = None
        #: Sharded saves being written, by their directory: this rank's part, for the committing driver.
        self.parts: dict[str, tuple[Future[RankPart], int]] = {}
        if own_process:  # SIGTERM to this process: a planned removal (trainer.cluster.leaving), not a crash
            watch_terminate(self.config.checkpoint.preempt_grace_s)

    def info(self) -> dict[str, Any]:
        """Who this worker is and the step of the run's state it holds (None: a spare that holds none yet).
        A cheap liveness check; it waits for a restore or snapshot load in progress."""
        with self.loading:
            step = self.worker.step if self.holds_state else None
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": _node_id(),  # where its relay runs (trainer.cluster.relay)
            "family": self.worker.adapter.name,
            "step": step,
            "nice": os.nice(0),  # its process's scheduling priority (Ray's default for workers: 15)
        }

    # --- group membership ----------------------------------------------------------------------------
    @passing_thread
    def join(
        self, rank: int, world_size: int, host: str, port: int, timeout_s: float, arm_faults: bool
    ) -> int:
        """Join the group whose rendezvous store is at ``host:port`` as ``rank``; returns this worker's step.

        ``arm_faults``: injected kill/hang faults may fire (the run's first incarnation only, so that a
        replacement does not fail the same way).
        """
        self.leave()
        self.stretch.reset()  # a stop asked of the previous incarnation (a rank that left) is done
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        # The backend's own timeouts and error handling follow timeout_s too (HCCL_EXEC_TIMEOUT, NCCL's).
        self.sockets = GroupSockets.joining(
            lambda: join_group(self.worker.adapter, timeout_s, store=store, rank=rank, world_size=world_size),
            store,
            rank,
            world_size,
        )
        self.worker.attach(rank, world_size)
        # Device faults belong to the devices of the first incarnation: a replacement is healthy.
        family = self.worker.adapter.name
        self.worker.faults = WorkerFaults(self.config, family, rank, self.worker.step, armed=arm_faults)
        return self.worker.step

    def leave(self) -> None:
        """Drop the current process group (after a peer failure it cannot be reused); nothing to do when it
        is already dropped (a survivor that left on the collective error is asked again by the repair)."""
        if not self.worker.attached and not dist.is_initialized():
            return
        self.worker.detach()  # release the DDP wrapper and its autograd hooks first
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
            gc.collect()  # the last references to the group go: its connections close now
        # ... unless something still holds the group (under FSDP, torch does): close them regardless.
        self.sockets.shutdown()
        self.sockets = GroupSockets()

    def release(self) -> int:
        """Shut down this rank's connections of its group (see :mod:`trainer.devices.group_sockets`): a
        collective in flight here fails at once, and so do the peers' waiting on this rank. Asked of every
        rank still training once a peer failed (:func:`trainer.cluster.watch.run_chunk`); answered while
        :meth:`train` runs (the actor is threaded). Returns how many sockets it shut down.

        Only while a chunk is being trained: the request is not awaited, and one that came late — after this
        rank left and joined the next group — must not shut that group's connections down."""
        return self.sockets.shutdown() if self.stretch.running else 0

    # --- training ------------------------------------------------------------------------------------
    def train(self, until_step: int, ahead: int | None = None, every: int = 0) -> dict[str, Any]:
        """Train until ``until_step`` and reply with one heartbeat (the steps' losses and times), going on
        towards ``ahead`` meanwhile, with chunk ends every ``every`` steps (:mod:`trainer.cluster.stretch`).
        A collective error comes back as ``ok=False``, with this rank out of its group."""
        return self.stretch.train(until_step, ahead, every)

    def stop_after(self, step: int) -> int:
        """Stop training after step ``step`` — or after the step now in flight, if that is a later one (it
        cannot be abandoned half done); answered while :meth:`train` runs. Returns this rank's step."""
        self.stretch.stop_after(step)
        return self.worker.step

    def progress(self) -> dict[str, Any]:
        """What this rank is doing now; answered while :meth:`train` runs (the actor is threaded)."""
        return dict(self.worker.progress)

    @dies_in_call
    @passing_thread
    def evaluate(self) -> float:
        return self.worker.evaluate()

    # --- state ---------------------------------------------------------------------------------------
    @dies_in_call
    @passing_thread
    def snapshot(self) -> dict[str, Any]:
        """:meth:`~trainer.worker_state.WorkerState.snapshot`, through the staging buffers only where Ray copies
        the reply (a member in the driver's process hands it over uncopied)."""
        return self.worker.snapshot(self.checkpointer if self.own_process else None)

    @dies_in_call
    @passing_thread
    def shard_copy(self) -> tuple[dict[str, Any], dict[str, int]]:
        """This rank's :meth:`~trainer.worker_state.WorkerState.shard_copy` and a small receipt (rank, step, bytes)
        the driver reads without fetching the copy; called with ``num_returns=2`` (both owned by the caller)."""
        copy = self.worker.shard_copy()
        size = sum(t.nbytes for t in copy["tensors"].values())
        return copy, {"rank": self.worker.rank, "step": self.worker.step, "bytes": size}

    @dies_in_call
    @passing_thread
    def load_snapshot(self, snap: dict[str, Any], rank: int) -> int:
        with self.loading:
            self.worker.rank = rank
            self.worker.load_snapshot(snap)
            self.holds_state = True
            return self.worker.step

    @dies_in_call
    @passing_thread
    def restore(self, root: str, keep_last: int) -> dict[str, Any] | None:
        # Leftovers of interrupted saves are the driver's to remove when every rank writes (one of the group's
        # saves may be in flight); else as before, by each member.
        clean = not shards_per_rank(self.config)
        with self.loading:
            restored = self.worker.restore(self._manager(root, keep_last), clean=clean)
            self.holds_state = True  # the checkpoint's state, or the initial state when there is none
        return None if restored is None else restored.reply()

    def sees(self, path: str) -> bool:
        """Whether ``path`` exists on this worker's node (is a checkpoint directory shared with the driver's)."""
        return os.path.exists(path)

    def _manager(self, root: str, keep_last: int) -> CheckpointManager:
        options = self.config.checkpoint
        return CheckpointManager(
            root,
            keep_last,
            options.storage_options,
            writer_priority=options.writer_priority,
            direct_io=options.direct_io,
        )

    @dies_in_call
    @passing_thread
    def save(
        self, root: str, keep_last: int, metrics: dict[str, float] | None = None, fence: Fence | None = None
    ) -> dict[str, Any]:
        """Replicated state (DDP): stage a checkpoint and return once the copy is done; the write and commit
        go on in the background. ``fence``: the driver's lease, checked before the commit (see
        trainer.checkpoint.lease). Sharded state is saved by every rank instead (:meth:`save_shards`).

        Returns the previous background save's committed path (if one finished since) and the time this
        call blocked training.
        """
        if is_sharded(self.worker.module):
            raise RuntimeError("sharded state is saved by every rank with save_shards, not by one with save")
        self.checkpointer = self._checkpointer(root, keep_last)
        previous = self.flush()
        self.checkpointer.manager.store.fence = fence
        self.worker.faults.before_save(self.worker.step, self.checkpointer)
        # The held-out loss at this step is the reference for a parity check after a later hand-over.
        self.worker.save_async(self.checkpointer, {"eval_loss": self.worker.evaluate(), **(metrics or {})})
        return {
            **previous,
            "blocking_s": self.checkpointer.last_blocking_s,
            "bytes": self.checkpointer.staged_bytes,
        }

    def _checkpointer(self, root: str, keep_last: int) -> AsyncCheckpointer:
        if self.checkpointer is None or self.checkpointer.manager.root != root:
            if self.checkpointer is not None:
                self.checkpointer.close()
            self.checkpointer = AsyncCheckpointer(self._manager(root, keep_last))
        return self.checkpointer

    @dies_in_call
    @passing_thread
    def save_shards(
        self, root: str, keep_last: int, directory: str, metrics: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """Sharded state (FSDP), every rank: stage this rank's shards and return once the copy is done; they
        are written into ``directory`` (the checkpoint's private directory, from the driver) in the
        background, with no collective, and :meth:`written` hands over what was written. The driver commits
        once every rank's part is in (:mod:`trainer.checkpoint.sharded`). Rank 0's reply carries the
        manifest's ``header``; every reply the time this call blocked training and the bytes staged."""
        checkpointer = self._checkpointer(root, keep_last)
        # The held-out loss at this step (a collective forward under FSDP: every rank takes part) is the
        # reference for a parity check after a later hand-over.
        metrics = {"eval_loss": self.worker.evaluate(), **(metrics or {})}
        part, header = self.worker.save_part_async(checkpointer, directory, metrics)
        self.parts[directory] = (part, self.worker.step)
        return {
            "header": header,
            "step": self.worker.step,
            "blocking_s": checkpointer.last_blocking_s,
            "bytes": checkpointer.staged_bytes,
        }

    def written(self, directory: str) -> dict[str, Any]:
        """Wait for this rank's part of the sharded save into ``directory``: ``{"part": RankPart}``, or
        ``{"failed": why}`` when it could not be written."""
        if directory not in self.parts:
            return {"failed": f"rank {self.worker.rank} staged no shards for {directory}"}
        part, step = self.parts.pop(directory)
        try:
            done = part.result()
        except Exception as exc:  # a full disk, an upload refused, …: the driver abandons the save
            return {"failed": f"rank {self.worker.rank}: {type(exc).__name__}: {exc}"}
        self.worker.faults.after_part_written(step)
        return {"part": done}

    @dies_in_call
    def flush(self) -> dict[str, Any]:
        """Wait for the background save: ``committed`` (its path or URL) and ``committed_bytes``, or
        ``failed`` (why it was not written)."""
        if self.checkpointer is None:
            return {"committed": None, "failed": None}
        try:
            path = self.checkpointer.wait()
        except CheckpointWriteError as exc:
            return {"committed": None, "failed": str(exc)}
        if path is None or isinstance(path, RankPart):  # a rank's part: the driver commits (written())
            return {"committed": None, "failed": None}
        return {
            "committed": str(path),
            "committed_bytes": self.checkpointer.manager.last_commit_bytes,
            "failed": None,
        }

    @passing_thread
    def parameters(self) -> dict[str, torch.Tensor]:
        """CPU copies of the model's parameters and buffers (for tests and parity checks)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.worker.module.state_dict().items()}

    # --- health ----------------------------------------------------------------------------------------
    @dies_in_call
    @passing_thread
    def probe(
        self, sizes_bytes: list[int], iters: int, timeout_s: float, pairwise: bool = True
    ) -> dict[str, Any]:
        """Interconnect probe over this incarnation's group (collective: every rank calls it) and a device
        probe of this rank's device. Never raises; failures and timeouts are in the result."""
        from trainer.health.device import probe_device
        from trainer.health.interconnect import alone, probe_interconnect

        worker = self.worker
        interconnect = (
            probe_interconnect(
                worker.device,
                sizes_bytes=tuple(sizes_bytes),
                iters=iters,
                pairwise=pairwise,
                faults=worker.faults.collective(worker.step),
                timeout_s=timeout_s,
            )
            if self.own_process
            else alone()  # a group of one: no process group, nothing between devices
        )
        device = probe_device(
            worker.adapter,
            worker.device,
            faults_wrong_compute=worker.faults.wrong_compute,
            timeout_s=timeout_s,
            vendor_tools_dir=self.config.probes.vendor_tools_dir,
        )
        return {"rank": worker.rank, "interconnect": interconnect, "device": device}
