"""Initial weights: a run that has no checkpoint of its own starts its model from a state dict on disk — a
pretrained model, or a file ``python -m trainer.export`` wrote from another run (fine-tuning).

Read with ``torch.load(weights_only=True)`` (tensors and plain containers only, no code), loaded with
``load_state_dict(strict=True)``: a missing or extra key is refused before the run starts, naming the file.
A run that resumes from its own checkpoint ignores them: the checkpoint holds the weights trained since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError

_KEY = "train.init_weights"


def resolve(path: str) -> str:
    """The absolute path of an existing file (relative paths: from the launching process's working
    directory, as the user typed it; workers run elsewhere)."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(f"{_KEY}={path!r}: no such file; allowed: a torch.save file of a model state dict")
    return str(resolved)


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Load the state dict in ``path`` into ``model`` (strict). Accepts what ``torch.save(model.state_dict())``
    and ``python -m trainer.export [--optimizer]`` write."""
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{_KEY}={path!r} cannot be read as a state dict ({type(exc).__name__}: {str(exc)[:200]}); allowed: "
            "a torch.save file of tensors by name"
        ) from None
    if (
        isinstance(loaded, dict)
        and isinstance(loaded.get("model"), dict)
        and set(loaded) <= {"model", "optimizer"}
    ):
        loaded = loaded["model"]  # the export's --optimizer layout: only the model is taken
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"{_KEY}={path!r} does not hold a state dict; allowed: a dict of tensors by name")
    try:
        model.load_state_dict(loaded, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise ConfigError(f"{_KEY}={path!r} does not fit the task's model: {detail}") from None
