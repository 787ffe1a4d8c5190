"""Launching a job from Python — a script or a notebook — rather than from the command line.

Kept apart from :mod:`trainer.api`, the contract a task is written against: that module is imported by the
workers and the framework's internals, this one starts the framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import open_dict

from trainer.api import Task
from trainer.config import CONFIG_MODULE
from trainer.errors import ExitCode
from trainer.job import run


def launch(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    task: type[Task] | str | None = None,
    task_args: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
) -> ExitCode:
    """Run a job from a script or a notebook and return how it ended (``trainer.errors.ExitCode``).

    ``overrides`` are what the command line takes (``["cluster=ray_local", "train.steps=100"]``); ``task`` is
    a :class:`~trainer.api.Task` subclass (importable by every worker: defined in a module, not in ``__main__``) or its
    dotted path, built with ``task_args``; ``run_dir`` is the run's home (default: the working directory).
    Re-running with the same ``run_dir`` resumes. Raises :class:`trainer.errors.ConfigError` on a bad value.
    """
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    if task is not None:
        target = task if isinstance(task, str) else f"{task.__module__}.{task.__qualname__}"
        with open_dict(cfg):
            cfg.task = {"_target_": target, **(task_args or {})}
    return run(cfg, run_dir=Path(run_dir) if run_dir is not None else Path.cwd())
