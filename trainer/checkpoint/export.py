"""A checkpoint's model (and optionally optimizer) state as one plain ``torch.save`` file, for use outside
the toolkit: inference, another framework, a notebook.

The file holds what plain torch expects, nothing of the toolkit's own:

- by default the model's state dict itself, keyed as ``model.state_dict()`` keys it, so
  ``model.load_state_dict(torch.load(path, weights_only=True))`` works;
- with the optimizer, ``{"model": <that state dict>, "optimizer": <state dict>}``, the optimizer's in the
  format of ``torch.optim.Optimizer.state_dict()`` (parameters numbered in param-group order, as torch numbers
  them), so ``optimizer.load_state_dict`` takes it. Flags that describe how a family runs the optimizer
  (``fused``, ``foreach``, …) were never saved; the optimizer that loads the file keeps its own defaults.

The checkpoint is verified (manifest checksum, every file's digest) before a tensor is read, and read with
the restricted loader; the output file is created exclusively, so an existing file is never overwritten.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import layout
from trainer.checkpoint.manager import read_tensors
from trainer.checkpoint.manifest import MANIFEST_NAME, Manifest
from trainer.checkpoint.store import CheckpointStore
from trainer.errors import CheckpointCorruptError, NoCheckpointError

#: Where a run directory keeps its checkpoints (``checkpoint.dir``'s default).
RUN_CHECKPOINTS = "checkpoints"


@dataclass
class Exported:
    """What :func:`export` wrote."""

    checkpoint: Path
    step: int
    out: Path
    #: Tensors written (model, plus optimizer state with ``optimizer=True``).
    tensors: int
    #: ``(path, reason)`` of newer checkpoints that were damaged and passed over.
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def find_checkpoint(source: Path) -> tuple[Path, Manifest, list[tuple[Path, str]]]:
    """The verified checkpoint ``source`` names, with its manifest and the damaged ones passed over.

    ``source`` is one checkpoint (``.../step_000000040``: it must verify, there is no fallback), a checkpoint
    directory, or a run directory (its ``checkpoints/``); from a directory, the newest checkpoint that
    verifies is taken. Raises NoCheckpointError when ``source`` is none of these, CheckpointCorruptError when
    the checkpoint (or every one in the directory) is damaged.
    """
    source = Path(source)
    if (source / MANIFEST_NAME).is_file():
        return source, CheckpointStore(source.parent).verify(source), []
    for root in (source, source / RUN_CHECKPOINTS):
        store = CheckpointStore(root)
        candidates = store.candidates()
        if not candidates:
            continue
        skipped: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                return path, store.verify(path), skipped
            except CheckpointCorruptError as exc:
                skipped.append((path, str(exc)))
        raise CheckpointCorruptError(
            f"{root}: every checkpoint is damaged: " + "; ".join(f"{p.name}: {why}" for p, why in skipped)
        )
    raise NoCheckpointError(
        f"{source}: not a checkpoint (no {MANIFEST_NAME}), nor a directory of step_* checkpoints, nor a run "
        f"directory with {RUN_CHECKPOINTS}/ — pass runs/<run>, runs/<run>/checkpoints or one step_* directory"
    )


def read_state(path: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Every tensor of the verified checkpoint ``path``, by its current (dotted) key."""
    into = {}
    for key, entry in manifest.tensors.items():
        dtype = getattr(torch, entry["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointCorruptError(
                f"{path / MANIFEST_NAME}: tensor {key!r} has unknown dtype {entry['dtype']!r}"
            )
        into[layout.from_disk(key, manifest.format_version)] = torch.empty(entry["shape"], dtype=dtype)
    read_tensors(path, into, manifest.format_version)
    return into


def torch_optimizer_state(tensors: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state as ``Optimizer.state_dict()`` gives it: parameters numbered across the param
    groups in order, hyper-parameters from the manifest."""
    index: dict[str, int] = {}
    groups = []
    for group in optimizer.get("param_groups", []):
        ids = [index.setdefault(fqn, len(index)) for fqn in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if (entry := layout.optimizer_entry(key)) is not None:
            state.setdefault(index[entry[0]], {})[entry[1]] = tensor
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def export(source: Path, out: Path, *, optimizer: bool = False) -> Exported:
    """Write the model (and with ``optimizer``, the optimizer) state of the checkpoint ``source`` names
    (see :func:`find_checkpoint`) to ``out`` with ``torch.save``. Raises FileExistsError, before reading
    anything, when ``out`` exists; a failed write leaves no file behind."""
    out = Path(out)
    if out.exists():
        raise _exists(out)
    path, manifest, skipped = find_checkpoint(source)
    tensors = read_state(path, manifest)
    model = {fqn: t for k, t in tensors.items() if (fqn := layout.model_fqn(k)) is not None}
    payload: dict[str, Any] = model
    written = len(model)
    if optimizer:
        optim = torch_optimizer_state(tensors, manifest.optimizer)
        payload = {"model": model, "optimizer": optim}
        written += sum(len(s) for s in optim["state"].values())
    created = False
    try:
        with open(out, "xb") as f:  # exclusive: a file that appeared meanwhile is not overwritten either
            created = True
            torch.save(payload, f)
    except BaseException as exc:
        if not created and isinstance(exc, FileExistsError):
            raise _exists(out) from None
        if created:  # a partial file is no export
            with contextlib.suppress(OSError):
                out.unlink()
        raise
    return Exported(path, manifest.step, out, written, skipped)


def _exists(out: Path) -> FileExistsError:
    return FileExistsError(f"{out} already exists; nothing was written (pass a new file name)")
