"""Comparing training states in tests: what a run's newest checkpoint holds, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointManager
from trainer.config import Config
from trainer.worker import Worker


def trained_worker(config: Config, steps: int = 0) -> Worker:
    """A set-up worker of ``config``, alone in its group (rank 0 of 1), after ``steps`` training steps."""
    worker = Worker(config)
    worker.setup()
    worker.attach(0, 1)
    for _ in range(steps):
        worker.train_step()
    return worker


def live_state(worker: Worker) -> dict[str, torch.Tensor]:
    """Copies of the worker's model parameters and buffers, its optimizer state, its LR scheduler's state and
    its task's extra state, by name (JSON values as the bytes of their JSON text)."""
    out = {f"model/{k}": v.detach().clone() for k, v in worker.module.state_dict().items()}
    for i, per_param in enumerate(worker.optimizer.state.values()):
        out.update({f"optim/{i}/{k}": v.detach().clone() for k, v in per_param.items()})
    if worker.scheduler is not None:
        out["scheduler"] = _json_bytes(worker.scheduler.state_dict())
    out["skipped_steps"] = _json_bytes(worker.nonfinite.skipped)
    for key, value in worker.task.extra_state().items():
        out[f"extra/{key}"] = (
            value.detach().clone() if isinstance(value, torch.Tensor) else _json_bytes(value)
        )
    return out


def _json_bytes(value: Any) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8)


def restored_state(config: Config, checkpoint_root: Path | str) -> dict[str, torch.Tensor]:
    """The state of the newest good checkpoint under ``checkpoint_root`` (a directory, or a URL reached with
    ``config.checkpoint.storage_options``), restored into a fresh worker."""
    worker = Worker(config)
    worker.setup()
    manager = CheckpointManager(checkpoint_root, storage_options=config.checkpoint.storage_options)
    if worker.restore(manager) is None:
        raise AssertionError(f"no checkpoint under {checkpoint_root}")
    return {**live_state(worker), "step": torch.tensor(worker.step)}


def mismatched(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit, or that only one side has."""
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]
