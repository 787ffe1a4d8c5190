"""The public surface: the contract between a user's training code and the framework.

A :class:`Task` says *what* is trained — the model, the optimizer, an LR scheduler, the data, the loss, the
evaluation and any extra state that must survive. The framework owns *how* it survives: device binding, the
DDP wrapper, backward, gradient accumulation and clipping, the grad scaler, the optimizer and scheduler steps,
the data position, progress marks for hang detection, peer snapshots, checkpoints, recovery and hand-over.
Because the loop's skeleton stays the framework's, every survival mechanism works on user code unchanged.

Select a task with ``+task._target_=my_pkg.MyTask`` (its other keys are passed to the constructor), or
from Python with :func:`trainer.launch.launch`. Without a ``task`` the built-in language model
(:class:`trainer.tasks.LanguageModelTask`, built from the ``model``, ``data`` and ``optim`` groups) runs.

Where each hook runs: on every rank's process (a Ray worker, or the driver for a single-process run), on
the device the family's adapter bound. Hooks must not call ``torch.distributed`` themselves, touch the
process group, or keep state outside what :meth:`Task.extra_state` returns: a replaced worker rebuilds the
task from its constructor and receives only that state.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate


class StepControl(Protocol):
    """What a manual :meth:`Task.train_step` calls; the framework's collectives and fences live behind it."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (the mean over this rank's batch) through the grad scaler, weighted by the
        rank's share of the global batch when the ranks' slices differ in size (the all-reduce runs inside)."""

    def optimizer_step(self) -> None:
        """Unscale, clip (``train.grad_clip``), step the optimizer and the scheduler, zero the gradients."""


class Task(ABC):
    """A user's training job. Subclass it, implement the four abstract hooks, override others as needed.

    The constructor runs once per process (each rank and each warm spare) with the keys of the ``task``
    config node; keep it cheap and deterministic — build heavy things in the hooks.
    """

    # --- what is trained -----------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, device: torch.device) -> nn.Module:
        """The model, on ``device``. Called once per process after ``torch.manual_seed(train.seed)``, so
        every rank and family builds the same initial weights. Return the bare module: the framework wraps
        it (DDP) when the group has more than one rank."""

    @abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameters (the bare module, never the wrapper)."""

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """With ``train.parallelism=fsdp``: the submodules sharded as units of their own (each gathered for
        its forward and backward, then freed), typically the transformer blocks; the whole model is the last
        unit. Default: none but the whole model."""
        return []

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any | None:
        """An LR scheduler stepped once per optimizer step, or None. Its ``state_dict()`` must be JSON (the
        built-in schedulers' are); it is saved in checkpoints and snapshots."""
        return None

    # --- data ----------------------------------------------------------------------------------------
    @abstractmethod
    def train_dataset(self) -> Dataset[Any]:
        """A map-style dataset. The framework owns the position in it: global sample ``i`` is item
        ``perm_e[i mod len]`` where ``perm_e`` is a permutation seeded by ``(train.seed, e)`` and
        ``e = i // len`` the epoch, so the data order is a pure function of the step on any world size.
        A dataset without ``__len__`` is an endless stream indexed by ``i`` directly."""

    def collate(self, samples: list[Any]) -> Any:
        """A batch from a list of samples (default: ``torch.utils.data.default_collate``). Batches may be
        tensors, tuples, dicts or dataclass instances of tensors; the framework moves them to the device."""
        return default_collate(samples)

    # --- the step ------------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one (micro-)batch, already on the device: the mean over its samples (the
        framework weights batches of unequal size by their sample counts). ``model`` is what to call
        (possibly the DDP wrapper); it may return a tensor, a dataclass or a dict. Runs under the family's
        autocast."""

    def train_step(self, model: nn.Module, batch: Any, control: StepControl) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the loss to report. Override for manual
        optimisation (several backward passes, a conditional step): call ``control.backward`` and
        ``control.optimizer_step`` yourself. Overriding requires ``train.grad_accum_steps=1``."""
        loss = self.loss(model, batch)
        control.backward(loss)
        control.optimizer_step()
        return loss

    # --- evaluation ----------------------------------------------------------------------------------
    def eval_dataset(self) -> Dataset[Any] | None:
        """A fixed held-out set (the same on every family and world size), or None for no evaluation."""
        return None

    def evaluate(self, model: nn.Module, batches: list[Any]) -> float:
        """The figure the hand-over's parity check compares across families, and the run reports, from the
        held-out ``batches`` (on the device, in eval mode, under ``torch.no_grad``). Default: the mean of
        :meth:`loss` weighted by batch size. Lower is not assumed; only equality across families is."""
        total, count = 0.0, 0
        for batch in batches:
            size = _batch_size(batch)
            total += float(self.loss(model, batch)) * size
            count += size
        return total / count if count else float("nan")

    def metrics(self) -> dict[str, float]:
        """Figures of the task's own — a running accuracy, a curriculum's level, an EMA's drift — reported with
        the built-in ones: rank 0's values reach the journal (``task_metrics``) and the metrics endpoint
        (``trainer_task_metric{name="..."}``). Called on every rank after each chunk of steps (in a
        single-process run, every ``train.log_interval`` steps), on the process that trains; must be cheap
        and must not call collectives. Values are numbers."""
        return {}

    # --- state that must survive ---------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """State outside the model and optimizer that must survive (EMA weights, counters, a curriculum's
        position): values are tensors or JSON (numbers, strings, booleans, None, lists and dicts of them).
        Saved in checkpoints and peer snapshots, device-neutral. Anything else is refused at launch. Like
        the model's, it must be the same on every rank: one rank's copy restores them all."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Adopt what :meth:`extra_state` returned (tensors arrive on the CPU)."""


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return _batch_size(batch[0])
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return _batch_size(getattr(batch, dataclasses.fields(batch)[0].name))
    raise TypeError(f"cannot tell the size of a {type(batch).__name__} batch; override Task.evaluate")
