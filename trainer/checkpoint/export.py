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
A checkpoint on object storage (``s3://bucket/prefix``, as ``checkpoint.dir`` names it) is downloaded into a
temporary local copy first, verified there, and the copy removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from trainer.checkpoint import layout
from trainer.checkpoint.locations import local_path, scheme
from trainer.checkpoint.manager import read_tensors
from trainer.checkpoint.manifest import MANIFEST_NAME, Manifest
from trainer.checkpoint.objects import ObjectStore
from trainer.checkpoint.store import NAME, CheckpointStore
from trainer.errors import CheckpointCorruptError, NoCheckpointError

#: Where a run directory keeps its checkpoints (``checkpoint.dir``'s default).
RUN_CHECKPOINTS = "checkpoints"


@dataclass
class Exported:
    """What :func:`export` wrote."""

    #: The checkpoint's directory, or its URL on object storage.
    checkpoint: Path | str
    step: int
    out: Path
    #: Tensors written (model, plus optimizer state with ``optimizer=True``).
    tensors: int
    #: ``(path or URL, reason)`` of newer checkpoints that were damaged and passed over.
    skipped: list[tuple[Path | str, str]] = field(default_factory=list)


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


@contextlib.contextmanager
def opened_checkpoint(
    source: Path | str, storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[Path, Manifest, Path | str, list[tuple[Path | str, str]]]]:
    """The verified checkpoint ``source`` names as a local directory: ``(directory, manifest, its path or
    URL, damaged ones passed over)``. A local ``source`` is as :func:`find_checkpoint` takes it; a URL names
    one checkpoint (``s3://b/run/step_000000040``) or a ``checkpoint.dir`` (its newest that verifies), read
    with ``storage_options`` (credentials, endpoint) through a temporary local copy."""
    if scheme(str(source)) is None:
        path, manifest, damaged = find_checkpoint(Path(local_path(str(source))))
        yield path, manifest, path, list(damaged)
        return
    url = str(source).rstrip("/")
    single = NAME.match(PurePosixPath(url).name) is not None
    store = ObjectStore(url.rsplit("/", 1)[0] if single else url, storage_options=storage_options)
    refs = [url] if single else store.candidates()
    if single and not store.fs.exists(f"{store.base}/{PurePosixPath(url).name}/{MANIFEST_NAME}"):
        raise NoCheckpointError(f"{url}: not a committed checkpoint (no {MANIFEST_NAME})")
    if not refs:
        raise NoCheckpointError(
            f"{url}: no committed checkpoint there (pass a checkpoint.dir URL or one step_*)"
        )
    skipped: list[tuple[Path | str, str]] = []
    for ref in refs:
        with store.opened(ref) as local:
            try:
                manifest = store.verify(local)
            except CheckpointCorruptError as exc:
                if single:
                    raise
                skipped.append((ref, str(exc)))
                continue
            yield local, manifest, ref, skipped
            return
    raise CheckpointCorruptError(
        f"{url}: every checkpoint is damaged: " + "; ".join(f"{r}: {why}" for r, why in skipped)
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


def export(
    source: Path | str, out: Path, *, optimizer: bool = False, storage_options: dict[str, Any] | None = None
) -> Exported:
    """Write the model (and with ``optimizer``, the optimizer) state of the checkpoint ``source`` names
    (see :func:`opened_checkpoint`) to ``out`` with ``torch.save``. Raises FileExistsError, before reading
    anything, when ``out`` exists; a failed write leaves no file behind."""
    out = Path(out)
    if out.exists():
        raise _exists(out)
    with opened_checkpoint(source, storage_options) as (path, manifest, where, skipped):
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
    return Exported(where, manifest.step, out, written, skipped)


def _exists(out: Path) -> FileExistsError:
    return FileExistsError(f"{out} already exists; nothing was written (pass a new file name)")
