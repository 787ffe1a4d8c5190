"""One rank of a training job: its device, the user's task, the data position and the train step.

The same class runs in the driver's process for a group of one and inside a Ray actor for each rank of a
worker group. It runs the task's hooks (:mod:`trainer.api`) inside the framework's skeleton — device,
DDP wrapper, backward, accumulation, clipping, scaler, optimizer and scheduler steps, progress marks — and
never decides anything about failures; it trains, saves and restores when told to.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from trainer import sharding
from trainer.api import Task
from trainer.checkpoint.rng import derive_seed
from trainer.config import Config
from trainer.data import GlobalBatchSampler, split
from trainer.data.positions import DataPositions, to_device
from trainer.data.prefetch import Prefetcher
from trainer.devices import DeviceAdapter, get_adapter
from trainer.errors import ConfigError, UserCodeError
from trainer.faults import NO_FAULTS, WorkerFaults
from trainer.metrics import checked_metrics
from trainer.nonfinite import NonFiniteSteps, grad_norm, skips_on_device
from trainer.sharding_comms import StepCollectives
from trainer.tasks import build_task
from trainer.worker_state import WorkerState

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepResult:
    step: int
    #: The step's loss, still on the device: read it with :func:`host_values`, many steps at once.
    loss: torch.Tensor
    step_time_s: float
    samples: int
    #: Seconds of the step not spent in collectives: DDP, from the start of the step to its first gradient
    #: collective; FSDP, the step less its time blocked in the sharded model's collectives; else the step.
    compute_s: float


class Worker(WorkerState):
    def __init__(
        self,
        config: Config,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        local_world_size: int = 1,
    ) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.step = 0
        self.samples_seen = 0
        self.history: list[dict[str, Any]] = []
        self._last_loss: float | torch.Tensor = float("nan")
        #: What this rank is doing, for hang detection: step, phase (idle/compute/collective), since when.
        self.progress: dict[str, Any] = {"step": 0, "phase": "idle", "since": time.time()}
        self.compute_s = float("nan")
        self._step_started = 0.0
        #: The faults this worker injects, installed from outside by its group (see trainer.faults).
        self.faults: WorkerFaults = NO_FAULTS
        #: FSDP's collectives mark progress, count their time and inject link faults through this.
        self.collectives = StepCollectives(self)
        self.attached = False
        self.staging = None
        self.pending_copy = None

    # --- set-up --------------------------------------------------------------------------------------
    def setup(self, adapter: DeviceAdapter | None = None) -> None:
        """Bind the device and build model, optimizer, scaler and data. Call once, before anything else."""
        cfg = self.config
        threads = cfg.device.num_threads or max(1, (os.cpu_count() or 1) // self.local_world_size)
        torch.set_num_threads(threads)
        self.adapter = adapter or get_adapter(cfg.device.family)
        self.device = self.adapter.bind(self.local_rank)
        self.dtype = _DTYPES[cfg.device.precision]
        if self.dtype not in self.adapter.supported_dtypes():
            raise ConfigError(
                f"device.precision={cfg.device.precision!r} is not supported on family {self.adapter.name!r}; "
                f"allowed there: {sorted(str(d) for d in self.adapter.supported_dtypes())}"
            )
        self.task: Task = build_task(cfg)
        self.build_initial()
        #: Set by the gradient all-reduce when it fails: an error in the step is then not the user's.
        self.collective_failed = False
        self.nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps)
        self.scaler = self.adapter.grad_scaler(enabled=self.dtype == torch.float16)
        self.data = DataPositions(self.task.train_dataset(), cfg.train.seed, self.task.collate)
        pin = self.device.type != "cpu"  # page-locked batches: the copy to an accelerator does not block
        self.prefetch = Prefetcher(self.data.batch, pin=pin, enabled=cfg.train.prefetches(self.device.type))
        #: Whether the task owns the whole step (it overrides ``train_step``).
        self.manual_step = type(self.task).train_step is not Task.train_step
        self.sampler = GlobalBatchSampler(cfg.train.global_batch_size, self.rank, self.world_size)
        self.adapter.seed(derive_seed(cfg.train.seed, 0, self.rank), self.device)

    def attach(self, rank: int, world_size: int) -> None:
        """Take ``rank`` of ``world_size`` in the process group just initialised; wrap the model in DDP.

        Called again after every re-formation of the group (a replaced worker, another world size): the
        data slice follows the new rank, and DDP is rebuilt on the new process group. With
        ``train.parallelism=fsdp`` the model is sharded over the group instead (:mod:`trainer.sharding`).
        """
        self.rank, self.world_size = rank, world_size
        self.sampler = GlobalBatchSampler(self.config.train.global_batch_size, rank, world_size)
        self.attached = True
        self.before_load()  # FSDP: shards of a group that is gone hold nothing; a load follows the join
        if world_size == 1:
            self.model = self.module
            self.after_load()  # a shard copy loaded before the join goes in now
            return
        if self.config.train.sharded:
            self.after_load()
            self.model = self.module
            return
        from torch.nn.parallel import DistributedDataParallel

        device_ids = None if self.device.type == "cpu" else [self.device]
        # Buffers are broadcast by _sync_buffers at the framework's boundary, not inside the user's forward.
        ddp = DistributedDataParallel(self.module, device_ids=device_ids, broadcast_buffers=False)
        # From 3 ranks on, every incarnation must lay DDP's buckets out alike, or the all-reduce adds the ranks'
        # gradients in another order on its first step and a recovered run drifts from an uninterrupted one in
        # the last bits. DDP lays out its first step in reversed parameter order and rebuilds the buckets after
        # it in the order the gradients came; fixing the layout before the first step (in parameter order)
        # makes it the same in every incarnation. Cost: with several buckets, the all-reduce no longer overlaps
        # the backward pass (lm_tokens' 27 ms steps ~2 % slower on the 2-core host). Two ranks keep DDP's own
        # layout: a sum of two is the same whichever bucket it is made in.
        if self.world_size > 2 and hasattr(ddp.reducer, "_push_all_rebuilt_params"):
            ddp.reducer._push_all_rebuilt_params()
        # DDP's own all-reduce, no comm hook: a Python hook per bucket made lm_tokens' 27 ms steps ~1 % slower
        # on the 2-core host than the one callback per step that marks the collective (_weighted_backward).
        self.model = ddp

    def detach(self) -> None:
        """The process group is about to go: drop the DDP wrapper (and its autograd hooks)."""
        self.model = self.module
        self.attached = False

    @property
    def last_loss(self) -> float:
        """The last step's loss. The step leaves it on the device; it is read here, when first asked for."""
        if isinstance(self._last_loss, torch.Tensor):
            self._last_loss = float(self._last_loss)
        return self._last_loss

    @last_loss.setter
    def last_loss(self, value: float | torch.Tensor) -> None:
        self._last_loss = value

    def mark(self, phase: str) -> None:
        self.progress = {"step": self.step, "phase": phase, "since": time.time()}

    # --- training ------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step on this rank's slice of the next global batch."""
        start = self._step_started = time.perf_counter()
        self.compute_s = float("nan")
        self.mark("compute")
        self.collectives.begin_step()
        if not self.module.training:  # evaluate() left it in eval mode; a walk over every module per step
            self.model.train()  # costs ~1 % of a small model's step on the CPU
        self.faults.before_step(self)  # injected kill, hang or slow device, if the group installed any
        self._rebuild_buckets()
        micro = self._micro_indices(self.step)
        batches = [self._user("train_dataset or collate", self.prefetch.get, m) for m in micro]
        if self.step + 1 < self.config.train.steps:
            self.prefetch.ahead(self._micro_indices(self.step + 1))  # collated while this step trains
        self.optimizer.zero_grad(set_to_none=True)
        self.collective_failed = False
        if self.manual_step:  # the task owns the step; the framework's backward and optimizer step serve it
            batch = to_device(batches[0], self.device)
            self._sync_buffers()
            with self.adapter.autocast(self.dtype):
                loss = self._user("train_step", self.task.train_step, self.model, batch, self)
        else:
            loss = self._accumulate(micro, batches)
        # The loss stays on the device: the host reads it once per chunk or log line (host_values). The step
        # waits for the device only for the non-finite check, and not even then with an optimizer that skips
        # on the device (trainer.nonfinite).
        self.last_loss = loss.detach()
        self.step += 1
        self.samples_seen += self.config.train.global_batch_size
        elapsed = time.perf_counter() - start
        self.mark("idle")
        # NaN: no DDP collective; then FSDP's time in collectives is left out (none without FSDP).
        compute = self.collectives.compute_s(elapsed) if self.compute_s != self.compute_s else self.compute_s
        return StepResult(self.step, loss.detach(), elapsed, self.sampler.local_batch_size, compute)

    def _rebuild_buckets(self) -> None:
        """DDP lays its buckets out anew once, at the start of the forward after its first backward (or, with
        the layout fixed in :meth:`attach`, of the first forward), with a broadcast from rank 0: a collective
        inside the user's forward, where a lost peer would read as the user's error. It is made here, before
        the forward, as the framework's collective (the family's link faults act on it as on any other)."""
        ddp: Any = self.model
        if getattr(ddp, "_has_rebuilt_buckets", True) or not torch.is_grad_enabled():
            return
        with self.collectives.blocked():
            if ddp.reducer._rebuild_buckets():
                ddp._has_rebuilt_buckets = True

    def _micro_indices(self, step: int) -> list[list[int]]:
        """This rank's global sample indices of ``step``, one list per micro-batch (one for a manual step)."""
        indices = self.sampler.indices(step)
        if self.manual_step:
            return [indices]
        micro, start = [], 0
        for size in split(len(indices), self.config.train.grad_accum_steps):
            micro.append(indices[start : start + size])
            start += size
        return micro

    def _accumulate(self, micro: list[list[int]], batches: list[Any]) -> torch.Tensor:
        """The task's loss on ``train.grad_accum_steps`` micro-batches, one backward each (DDP all-reduces on
        the last one only), then one optimizer step; returns the mean loss."""
        sizes = [len(m) for m in micro]
        total = sum(sizes)
        losses = []
        for i, (size, batch) in enumerate(zip(sizes, batches, strict=True)):
            defer = i < len(sizes) - 1 and hasattr(self.model, "no_sync")  # DDP: no all-reduce until the last
            with self.model.no_sync() if defer else contextlib.nullcontext():  # type: ignore[operator]
                self._sync_buffers()
                with self.adapter.autocast(self.dtype):
                    loss = self._user("loss", self.task.loss, self.model, to_device(batch, self.device))
                # Each micro-batch's mean loss weighs its share of the global batch (1/accum when even).
                self._weighted_backward(loss, self.sampler.share * Fraction(size, total))
            losses.append(loss.detach())
        self.optimizer_step()
        if len(losses) == 1:
            return losses[0]
        if len(set(sizes)) == 1:
            return torch.stack(losses).mean()
        return sum(loss * size for loss, size in zip(losses, sizes, strict=True)) / total

    def _user(self, hook: str, fn: Any, *args: Any) -> Any:
        """Call the user's code. What it raises is a :class:`UserCodeError` naming the hook, the step and the
        rank — unless a collective of the framework failed inside the call (a manual step's backward, FSDP's
        gathers in the forward): that stays an infrastructure fault for the policy."""
        try:
            return fn(*args)
        except UserCodeError:
            raise  # the framework's own verdict on the user's run (non-finite steps), raised inside a hook
        except Exception as exc:
            if self.collective_failed or sharding.raised_in_collective(exc):
                raise
            trace = "".join(traceback.format_exception(exc))
            raise UserCodeError(
                f"Task.{hook} raised {type(exc).__name__}: {exc} (step {self.step + 1}, rank {self.rank})\n{trace}"
            ) from None

    def _sync_buffers(self) -> None:
        """Rank 0's buffers to every rank before a forward, as DDP would — here, outside the user's call."""
        if self.world_size > 1 and self.buffers:
            for buffer in self.buffers:
                torch.distributed.broadcast(buffer, src=0)

    # StepControl: what the task's train_step calls (see trainer.api.StepControl).
    def backward(self, loss: torch.Tensor) -> None:
        self._weighted_backward(loss, self.sampler.share)

    def _weighted_backward(self, loss: torch.Tensor, weight: Fraction) -> None:
        """Backward of ``weight * loss`` (``loss`` a mean over its samples), through the grad scaler.

        Under DDP a backward that all-reduces the gradients ends in that collective: DDP launches each bucket's
        all-reduce as its gradients are ready and waits for them all in a callback queued at the end of the
        backward. Queued at the start, :meth:`_entering_collective` runs just before that wait: the end of
        this rank's compute for the step (straggler detection), "in a collective since t" (hang detection:
        a rank waiting for a peer is not the culprit), the family's link faults. What the backward raises
        after it is the collective's, not the user's (:meth:`_user`)."""
        if weight != 1:  # an exact division where the weight is 1/k keeps even splits' results bit for bit
            loss = loss / weight.denominator if weight.numerator == 1 else loss * float(weight)
        scaled = self.scaler.scale(loss)
        if scaled.requires_grad and getattr(self.model, "require_backward_grad_sync", False):  # not no_sync()
            scaled.register_hook(self._queue_entering_collective)
        try:
            scaled.backward()
        except Exception:
            if self.progress["phase"] == "collective":
                self.collective_failed = True  # not the user's code: the gradient all-reduce failed
            raise

    def _queue_entering_collective(self, grad: torch.Tensor) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._entering_collective)  # type: ignore[attr-defined]

    def _entering_collective(self) -> None:
        if self.progress["phase"] == "compute":
            self.compute_s = time.perf_counter() - self._step_started
            self.mark("collective")
        self.faults.in_collective(self)

    def optimizer_step(self) -> None:
        """Clip, then step the optimizer and the scheduler — unless the gradients are not finite: then the
        step is skipped on every rank alike (see :mod:`trainer.nonfinite`). An optimizer that can skip on
        the device is handed the decision there, and the scheduler steps when the host has read it."""
        self.scaler.unscale_(self.optimizer)  # nothing to do unless fp16 scaling is on
        clip = self.config.train.grad_clip
        params = self.module.parameters()
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else grad_norm(params)
        norm = sharding.full_norm(norm)  # FSDP: the norm over every rank's shards
        # Not under fp16 (the GradScaler's own skip) nor FSDP (the flag would meet sharded parameters).
        on_device = not self.scaler.is_enabled() and not sharding.is_sharded(self.module)
        if on_device and skips_on_device(self.optimizer):
            optimizer = self.optimizer
            optimizer.found_inf = self.nonfinite.defer(self.step + 1, norm, self._scheduler_step)  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
            return
        if self.nonfinite.skip(self.step + 1, norm):
            self.scaler.update()  # fp16: the scaler lowers its scale; otherwise nothing
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._scheduler_step()

    def _scheduler_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def task_metrics(self) -> dict[str, float]:
        """The task's own figures (:meth:`Task.metrics`), checked: numbers by name."""
        values = self._user("metrics", self.task.metrics)
        return checked_metrics(values, f"rank {self.rank}")

    @torch.no_grad()
    def evaluate(self) -> float:
        """The task's evaluation on its fixed held-out set (the same on every family and world size)."""
        held_out: Any = self.task.eval_dataset()
        count = min(self.config.train.eval_samples, len(held_out)) if held_out is not None else 0
        if count == 0:
            return float("nan")
        self.module.eval()
        size = self.config.train.global_batch_size
        batches = [
            to_device(self.task.collate([held_out[i] for i in range(j, min(j + size, count))]), self.device)
            for j in range(0, count, size)
        ]
        with self.adapter.autocast(self.dtype):
            return float(self._user("evaluate", self.task.evaluate, self.module, batches))


def host_values(losses: list[torch.Tensor]) -> list[float]:
    """Step losses left on the device, read on the host in one transfer (one wait for the device)."""
    if not losses:
        return []
    return [float(v) for v in torch.stack([loss.float() for loss in losses]).cpu().tolist()]
