"""A rank's training state in and out: checkpoints (written through a manager, staged asynchronously,
restored with their data position) and in-memory snapshots handed to a replacement worker.

A part of :class:`~trainer.worker.Worker` kept in a file of its own; the attributes below are the worker's.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from trainer import shard_copy, sharding
from trainer.api import Task
from trainer.checkpoint import CheckpointManager, Restored, TrainingProgress
from trainer.checkpoint import state as portable
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.initial import load_initial_weights
from trainer.checkpoint.locations import redact
from trainer.checkpoint.rng import derive_seed
from trainer.checkpoint.sharded import RankPart, manifest_header, split
from trainer.checkpoint.staging import StagingBuffers
from trainer.compiling import compile_module
from trainer.config import Config, to_container
from trainer.devices import DeviceAdapter
from trainer.errors import ConfigError
from trainer.nonfinite import NonFiniteSteps
from trainer.sharding_comms import StepCollectives


class WorkerState:
    config: Config
    task: Task
    adapter: DeviceAdapter
    device: torch.device
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    scheduler: Any
    nonfinite: NonFiniteSteps
    rank: int
    world_size: int
    step: int
    samples_seen: int
    history: list[dict[str, Any]]
    last_loss: float
    model: torch.nn.Module
    buffers: list[torch.Tensor]
    dtype: torch.dtype
    #: In a process group now (between attach and detach).
    attached: bool
    #: The staging buffers of the last background save, whose copies may still be in flight (CUDA).
    staging: StagingBuffers | None
    #: FSDP: the step's time blocked in the sharded model's collectives (see trainer.sharding_comms).
    collectives: StepCollectives
    #: FSDP: a shard copy loaded before the group formed, applied once the model is sharded in it.
    pending_copy: dict[str, Any] | None
    #: What this rank is doing, for hang detection: step, phase, since when (see ``Worker.mark``).
    progress: dict[str, Any]

    def mark(self, phase: str) -> None:
        raise NotImplementedError

    # --- checkpoints ---------------------------------------------------------------------------------
    def _progress(self, metrics: dict[str, float] | None) -> TrainingProgress:
        return TrainingProgress(
            step=self.step,
            samples_seen=self.samples_seen,
            world_size=self.world_size,
            seed=self.config.train.seed,
            history=self.history,
            metrics={"loss": self.last_loss, **(metrics or {})},
        )

    def capture(self, *, gather: bool = True) -> portable.PortableState:
        """The whole training state, tensors not yet copied: model, optimizer, scaler, scheduler, the task's
        extra state. Sharded (FSDP), every tensor is gathered whole: every rank of the group must call it;
        without ``gather`` the sharded tensors stay this rank's DTensors (no collective)."""
        self.nonfinite.settle()  # the last step's scheduler step, if the device left it undecided
        state = portable.capture(
            self.module,
            self.optimizer,
            self.scaler,
            self.scheduler,
            self.nonfinite.with_state(self.task.extra_state()),
        )
        if gather and sharding.is_sharded(self.module):
            state.tensors = sharding.gathered(state.tensors)
        return state

    def build_initial(self) -> None:
        """The model (the initial weights), its optimizer and scheduler, unsharded and unwrapped."""
        # Same seed on every rank and family: the initial model is identical everywhere.
        torch.manual_seed(self.config.train.seed)
        self.module = self.task.build_model(self.device)
        if self.config.train.init_weights:
            load_initial_weights(self.module, self.config.train.init_weights)
        if self.config.train.compile:
            compile_module(self.module, self)  # in place: the state dict's keys stay the plain model's
        #: What the train step calls: ``module`` itself, or a DDP wrapper of it after ``attach``.
        self.model = self.module
        self.buffers = list(self.module.buffers())
        self.optimizer = self.task.build_optimizer(self.module)
        self.scheduler = self.task.build_scheduler(self.optimizer)

    def before_load(self) -> None:
        """FSDP: a load goes into a fresh unsharded model (a sharded one takes no full state, and once its
        group is gone it holds nothing usable); :meth:`after_load` shards it again in a live group. A save's
        copies still reading the state land first."""
        if self.staging is not None:
            self.staging.fence()
        if sharding.is_sharded(self.module):
            self.build_initial()

    def after_load(self) -> None:
        """FSDP in a live group: shard the model loaded whole (a no-op once it is sharded), then put in the
        shard copy loaded meanwhile, if any."""
        if (
            self.config.train.sharded
            and self.attached
            and self.world_size > 1
            and not sharding.is_sharded(self.module)
        ):
            self.optimizer, self.scheduler = sharding.shard(
                self.module, self.optimizer, self.scheduler, self.task, self.dtype, self.collectives
            )
        if self.attached and self.pending_copy is not None:
            self._apply_copy(self.pending_copy)
            self.pending_copy = None

    def save(self, manager: CheckpointManager, metrics: dict[str, float] | None = None) -> Path | str:
        """Write and commit a checkpoint now (blocks for the whole write)."""
        return manager.save(
            self.capture(),
            self.adapter.get_rng_state(self.device),
            self.adapter,
            self._progress(metrics),
            to_container(self.config),
        )

    def save_async(
        self, checkpointer: AsyncCheckpointer, metrics: dict[str, float] | None = None
    ) -> Future[Path | str]:
        """Stage a checkpoint (blocks only for the copy; on CUDA not even that: the copies of the
        parameters and optimizer state overlap with training until the next optimizer step) and commit it
        in the background."""
        self.staging = checkpointer.staging
        return checkpointer.save(
            self.capture(),
            self.adapter.get_rng_state(self.device),
            self.adapter,
            self._progress(metrics),
            to_container(self.config),
            overlap=self.optimizer,
        )

    def save_part_async(
        self, checkpointer: AsyncCheckpointer, directory: Path | str, metrics: dict[str, float] | None = None
    ) -> tuple[Future[RankPart], dict[str, Any] | None]:
        """Sharded state (FSDP): stage this rank's shards (no collective; the copies of the shards the
        optimizer steps overlap with training until its next step, as in :meth:`save_async`) and write
        them into ``directory``, a sharded checkpoint's private directory (on object storage, its URL), in the
        background. Returns the
        future of this rank's :class:`~trainer.checkpoint.sharded.RankPart` and, on rank 0, the manifest's
        header (else None); the party that commits needs every rank's part and the header."""
        self.staging = checkpointer.staging
        state = self.capture(gather=False)
        header = None
        if self.rank == 0:
            header = manifest_header(
                state,
                self.adapter.name,
                self.adapter.rng_key(),
                self.adapter.describe(),
                self._progress(metrics),
                redact(to_container(self.config)),
            )
        part = checkpointer.save_part(
            directory,
            self.rank,
            split(state.tensors, self.rank),
            self.adapter.rng_key(),
            self.adapter.get_rng_state(self.device),
            overlap=self.optimizer,
        )
        return part, header

    def restore(self, manager: CheckpointManager, *, clean: bool = True) -> Restored | None:
        """Restore the newest good checkpoint (see ``CheckpointManager.restore``; ``clean``: remove the
        leftovers of interrupted saves first — not while a save of the group may be in flight). FSDP in a
        live group: the fresh model is sharded first, so each rank reads only its slices of the checkpoint
        (DCP picks them out of whatever world size wrote it)."""
        self.pending_copy = None
        self.before_load()
        self.after_load()
        try:
            return self._restore(manager, clean)
        finally:
            self.after_load()

    def _restore(self, manager: CheckpointManager, clean: bool) -> Restored | None:
        restored = manager.restore(
            self.module,
            self.optimizer,
            self.scaler,
            self.adapter,
            self.device,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.config.train.seed,
            scheduler=self.scheduler,
            extra=self.task.extra_state(),
            clean=clean,
        )
        if restored is not None:
            self.task.load_extra_state(self.nonfinite.take_state(restored.extra))
            self.step = restored.manifest.step
            self.samples_seen = restored.manifest.samples_seen
            self.history = restored.history
            self.last_loss = float(restored.manifest.metrics.get("loss", float("nan")))
            if self.samples_seen != self.step * self.config.train.global_batch_size:
                raise ConfigError(
                    f"train.global_batch_size={self.config.train.global_batch_size} differs from the checkpoint's "
                    f"({self.samples_seen} samples in {self.step} steps); allowed: the value the run started with"
                )
        return restored

    # --- in-memory snapshots (peer recovery) -------------------------------------------------------
    def snapshot(self, staging: AsyncCheckpointer | None = None) -> dict[str, Any]:
        """A CPU copy of the full training state, to hand to a replacement worker through Ray's object store.

        Every rank of a DDP group holds the same parameters, optimizer state and task state, so one survivor's
        snapshot restores any rank. The copy is taken now; training may continue while it is shipped.

        ``staging``: this rank's checkpointer, whose staging buffers take the copy when no save is still
        writing from them (no second copy of the state in host memory). Its tensors are then valid only until
        the next save: the caller hands them on at once — Ray copies a returned value into its object store
        before the call ends. While a save is still writing, the snapshot takes a copy of its own rather than
        wait: a recovery is not held up by the remaining write.
        """
        state = self.capture()
        if staging is not None and not staging.busy:
            return self._held(state, staging.stage(state.tensors))
        return self._held(state, {k: t.detach().to("cpu", copy=True) for k, t in state.tensors.items()})

    def _held(self, state: portable.PortableState, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What a snapshot or a shard copy hands over: ``tensors`` (host copies) and the state beside them."""
        return {
            "tensors": tensors,
            "optimizer": state.optimizer,
            "scaler": state.scaler,
            "task_state": state.task_state,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "history": list(self.history),
            "last_loss": self.last_loss,
        }

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        """Adopt a peer's :meth:`snapshot` (RNG re-derived from (seed, step, rank)), or this rank's own
        :meth:`shard_copy` (see :meth:`_adopt_copy`)."""
        if snap.get("kind") == shard_copy.KIND:
            self._adopt_copy(snap)
            return
        self.pending_copy = None
        self.before_load()
        extra = portable.apply(
            snap["tensors"],
            snap["optimizer"],
            snap["scaler"],
            self.module,
            self.optimizer,
            self.scaler,
            snap["task_state"],
            self.scheduler,
        )
        self.task.load_extra_state(self.nonfinite.take_state(extra))
        self.step, self.samples_seen = int(snap["step"]), int(snap["samples_seen"])
        self.history, self.last_loss = list(snap["history"]), float(snap["last_loss"])
        self.adapter.seed(derive_seed(self.config.train.seed, self.step, self.rank), self.device)
        self.after_load()

    # --- shard copies (FSDP recovery without the disk, see trainer.shard_copy) ------------------------
    def shard_copy(self) -> dict[str, Any]:
        """A CPU copy of the state this rank holds itself — its local shards, the replicated tensors and the
        non-tensor state — and its RNG state: what this rank needs to go on from this step in a group of the
        same world size. No collective; taken now, training may continue while it is shipped."""
        state = self.capture(gather=False)
        return {
            **self._held(state, shard_copy.take(state.tensors)),
            "kind": shard_copy.KIND,
            "rank": self.rank,
            "world_size": self.world_size,
            "rng": (self.adapter.rng_key(), self.adapter.get_rng_state(self.device)),
        }

    def _adopt_copy(self, copy: dict[str, Any]) -> None:
        """Take a :meth:`shard_copy` of this rank (same rank, same world size) as this rank's state: the
        step and data position now, the tensors once the model is sharded in the group (:meth:`after_load`;
        at once when it already is). The RNG is the copy's own (the rank's stream goes on as if never
        interrupted); from another family, re-derived from (seed, step, rank)."""
        self.before_load()
        self.step, self.samples_seen = int(copy["step"]), int(copy["samples_seen"])
        self.history, self.last_loss = list(copy["history"]), float(copy["last_loss"])
        self.pending_copy = copy
        self.after_load()

    def _apply_copy(self, copy: dict[str, Any]) -> None:
        if (copy["rank"], copy["world_size"]) != (self.rank, self.world_size):
            raise ConfigError(
                f"the shard copy of rank {copy['rank']} of {copy['world_size']} cannot be loaded as rank "
                f"{self.rank} of {self.world_size}; allowed: a copy of the same rank and world size"
            )
        like = portable.template(self.module, self.optimizer, self.task.extra_state())
        extra = portable.apply(
            shard_copy.rebuild(copy["tensors"], like),
            copy["optimizer"],
            copy["scaler"],
            self.module,
            self.optimizer,
            self.scaler,
            copy["task_state"],
            self.scheduler,
        )
        self.task.load_extra_state(self.nonfinite.take_state(extra))
        key, rng = copy["rng"]
        if key == self.adapter.rng_key():
            self.adapter.set_rng_state(rng, self.device)
        else:
            self.adapter.seed(derive_seed(self.config.train.seed, self.step, self.rank), self.device)
