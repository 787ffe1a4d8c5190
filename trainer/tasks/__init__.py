"""Tasks shipped with the toolkit, and how the job builds the one its config names.

A user's own task subclasses :class:`trainer.api.Task` the same way :class:`LanguageModelTask` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trainer.api import Task
from trainer.errors import ConfigError
from trainer.nonfinite import STATE_KEY
from trainer.tasks.lm import LanguageModelTask

if TYPE_CHECKING:
    from trainer.config import Config

__all__ = ["LanguageModelTask", "build_task", "check_task"]


def build_task(config: Config) -> Task:
    """The task of ``config.task`` (a ``_target_`` node), else the built-in language model built from the
    ``model``, ``data`` and ``optim`` groups. Raises :class:`ConfigError` naming ``task._target_``."""
    if config.task is None:
        return LanguageModelTask(config.model, config.data, config.optim, config.train.eval_samples)
    node = config.task if isinstance(config.task, dict) else OmegaConf.to_container(config.task)
    assert isinstance(node, dict), "validate() leaves the task node a mapping"
    try:
        task = instantiate(node)
    except InstantiationException as exc:
        raise ConfigError(
            f"task._target_={node.get('_target_')!r} could not be built: {exc.__cause__ or exc}; allowed: the "
            "dotted path of a trainer.api.Task subclass whose constructor takes the node's other keys"
        ) from None
    if not isinstance(task, Task):
        raise ConfigError(
            f"task._target_={node.get('_target_')!r} builds a {type(task).__name__}; allowed: a subclass of "
            "trainer.api.Task"
        )
    return task


def check_task(config: Config) -> None:
    """Build the task once on this process's CPU and try each hook on a first batch, before any worker
    starts or anything is written: a hook missing, returning the wrong type or raising is a
    :class:`ConfigError` naming the hook and what is allowed. (The model is built here once, on the CPU.)"""
    import torch
    from torch import nn

    from trainer.checkpoint.initial import load_initial_weights
    from trainer.checkpoint.state import json_tree
    from trainer.data.positions import DataPositions
    from trainer.errors import CheckpointIncompatibleError, UserCodeError
    from trainer.metrics import checked_metrics

    task = build_task(config)
    name = type(task).__name__

    def refuse(hook: str, what: str) -> ConfigError:
        return ConfigError(f"task {name}: {hook} {what}")

    def call(hook: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise refuse(hook, f"raised {type(exc).__name__}: {exc}") from exc

    torch.manual_seed(config.train.seed)
    model = call("build_model", task.build_model, torch.device("cpu"))
    if not isinstance(model, nn.Module):
        raise refuse("build_model", f"returned a {type(model).__name__}; allowed: a torch.nn.Module")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        raise refuse(
            "build_model",
            "returned a torch.compile'd module (its state dict's keys carry '_orig_mod.': its checkpoints would "
            "not load into the plain model); allowed: the bare module, with train.compile=true to compile it",
        )
    if config.train.init_weights:
        load_initial_weights(model, config.train.init_weights)
    optimizer = call("build_optimizer", task.build_optimizer, model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise refuse(
            "build_optimizer", f"returned a {type(optimizer).__name__}; allowed: a torch.optim.Optimizer"
        )
    scheduler = call("build_scheduler", task.build_scheduler, optimizer)
    dataset = call("train_dataset", task.train_dataset)
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise refuse("train_dataset", "returned a dataset of length 0; allowed: at least one sample")
    manual = type(task).train_step is not Task.train_step
    if manual and config.train.grad_accum_steps > 1:
        raise refuse(
            "train_step",
            f"is overridden (manual optimisation) with train.grad_accum_steps={config.train.grad_accum_steps}; "
            "allowed: train.grad_accum_steps=1, or accumulate inside your train_step",
        )
    if not manual:
        micro = config.train.global_batch_size // (config.cluster.workers * config.train.grad_accum_steps)
        positions = DataPositions(dataset, config.train.seed, task.collate)
        batch = call("collate", positions.batch, list(range(micro)))
        loss = call("loss", task.loss, model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
            shown = (
                f"a tensor of shape {list(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else type(loss).__name__
            )
            raise refuse("loss", f"returned {shown}; allowed: a scalar floating-point tensor")
    try:
        if scheduler is not None:
            json_tree(scheduler.state_dict(), "the LR scheduler's state_dict()")
        extra = call("extra_state", task.extra_state)
        if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
            raise refuse(
                "extra_state", f"returned a {type(extra).__name__}; allowed: a dict with string keys"
            )
        if STATE_KEY in extra:
            raise refuse("extra_state", f"uses the key {STATE_KEY!r}, which the framework keeps for itself")
        for key, value in extra.items():
            if not isinstance(value, torch.Tensor):
                json_tree(value, f"extra state {key!r}")
    except CheckpointIncompatibleError as exc:
        raise refuse("state", f"cannot be saved: {exc}") from None
    try:
        checked_metrics(call("metrics", task.metrics), "the driver's check")
    except UserCodeError as exc:
        raise refuse("metrics", str(exc).removeprefix("Task.metrics ")) from None
