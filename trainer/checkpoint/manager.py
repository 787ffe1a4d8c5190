"""Save and restore device-neutral checkpoints: DCP tensors, JSON manifest, per-rank RNG, atomic commit.

:meth:`CheckpointManager.save` blocks until the checkpoint is committed. :meth:`CheckpointManager.restore`
walks the committed checkpoints newest first, skips (with a warning naming the file) any whose manifest or
files do not check out, and restores the first good one; a checkpoint that is intact but does not fit the
model is a hard error, since an older one of the same run would not fit either.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint import layout
from trainer.checkpoint import rng as rng_io
from trainer.checkpoint import state as portable
from trainer.checkpoint.dcp_writer import DigestingWriter
from trainer.checkpoint.locations import local_path, redact, scheme
from trainer.checkpoint.manifest import Manifest, checksum_files
from trainer.checkpoint.objects import ObjectStore
from trainer.checkpoint.safe_dcp import SafeFileSystemReader, TensorOnlyLoadPlanner
from trainer.checkpoint.sharded import manifest_header
from trainer.checkpoint.store import CheckpointStore
from trainer.devices import DeviceAdapter
from trainer.errors import CheckpointCorruptError, CheckpointWriteError, NoCheckpointError

log = logging.getLogger(__name__)

#: DCP writer threads: two keep the disk busy while one serialises (more only contend on small hosts).
_WRITER_THREADS = 2


@dataclass
class TrainingProgress:
    """Where the run is, as recorded in a manifest."""

    step: int
    samples_seen: int
    world_size: int
    seed: int
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Restored:
    #: The checkpoint restored: its directory, or its URL on object storage.
    path: Path | str
    manifest: Manifest
    #: True when RNG state continued bit for bit; False when it was re-derived from (seed, step, rank).
    rng_restored: bool
    #: ``(path, reason)`` of newer checkpoints that were damaged and skipped.
    skipped: list[tuple[Path | str, str]]
    #: History of the restored state including this restore's family change, if any.
    history: list[dict[str, Any]]
    #: The task's extra state (tensors and JSON values), for ``Task.load_extra_state``.
    extra: dict[str, Any] = field(default_factory=dict)

    def reply(self) -> dict[str, Any]:
        """What was restored, as plain data (a member's answer to its driver; the restore report's source)."""
        return {
            "path": str(self.path),
            "step": self.manifest.step,
            "family": self.manifest.family,
            "rng_restored": self.rng_restored,
            "metrics": dict(self.manifest.metrics),
            "skipped": [(str(p), why) for p, why in self.skipped],
        }


def open_store(
    where: str | Path, keep_last: int = 3, storage_options: dict[str, Any] | None = None
) -> CheckpointStore | ObjectStore:
    """The store of ``checkpoint.dir``: a directory (a path or ``file://``), or object storage (``s3://``)."""
    if isinstance(where, str) and scheme(where) is not None:
        return ObjectStore(where, keep_last, storage_options)
    return CheckpointStore(Path(local_path(str(where))), keep_last)


class CheckpointManager:
    def __init__(
        self,
        root: str | Path,
        keep_last: int = 3,
        storage_options: dict[str, Any] | None = None,
        *,
        direct_io: bool = True,
        writer_priority: str = "normal",
    ) -> None:
        self.store = open_store(root, keep_last, storage_options)
        #: Bytes of the files of the most recent checkpoint this manager committed.
        self.last_commit_bytes = 0
        #: Write the data files with O_DIRECT where the filesystem allows it (``checkpoint.direct_io``; see
        #: ``dcp_writer``): from the staging buffers to the disk, no copy through the page cache.
        self.direct_io = direct_io
        #: The CPU priority of the background writer's threads (``checkpoint.writer_priority``).
        self.writer_priority = writer_priority

    @property
    def root(self) -> str:
        """Where the checkpoints live: a directory, or a URL."""
        return str(self.store)

    def save(
        self,
        state: portable.PortableState,
        rng_states: dict[str, torch.Tensor],
        adapter: DeviceAdapter,
        progress: TrainingProgress,
        config: dict[str, Any],
        *,
        retain: bool = True,
    ) -> Path | str:
        """Write and commit one checkpoint (single process); returns its final directory (or URL). With
        ``retain`` the checkpoints beyond ``keep_last`` are then deleted (else call :meth:`retain`)."""
        final = self._write(state, rng_states, adapter, progress, config)
        if retain:
            self.retain(final)
        return final

    def retain(self, keep: Path | str) -> None:
        """Delete the committed checkpoints beyond ``keep_last``, never ``keep``; a failure is logged (the
        new checkpoint is committed either way)."""
        try:
            self.store.retain(keep)
        except Exception as exc:  # s3fs raises its own errors besides OSError
            log.warning("could not delete old checkpoints in %s: %s", self.root, exc)

    def _write(
        self,
        state: portable.PortableState,
        rng_states: dict[str, torch.Tensor],
        adapter: DeviceAdapter,
        progress: TrainingProgress,
        config: dict[str, Any],
    ) -> Path | str:
        tmp = self.store.begin(progress.step)
        try:
            cpu_tensors = {k: t.detach().to("cpu") for k, t in state.tensors.items()}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                # No fsync per file here: the commit fsyncs the whole directory once, before the rename.
                writer = DigestingWriter(tmp, thread_count=_WRITER_THREADS, direct=self.direct_io)
                dcp.save(layout.nested(cpu_tensors), storage_writer=writer, no_dist=True)
            rng_io.write_rng(tmp, 0, adapter.rng_key(), rng_states)
            manifest = self._manifest(tmp, state, adapter, progress, redact(config), writer.digests)
            self.last_commit_bytes = sum(f["bytes"] for f in manifest.files.values())
            return self.store.commit(tmp, manifest)
        except BaseException as exc:
            free = shutil.disk_usage(tmp).free if tmp.exists() else None
            self.store.abandon(tmp)
            cause = write_failure(exc)
            if cause is None:
                raise
            needed = sum(t.numel() * t.element_size() for t in state.tensors.values())
            disk = (
                f" (No space left on device: {free} bytes free, {needed} needed)"
                if free is not None and free < needed
                else ""
            )
            previous = self.store.latest_pointer()
            raise CheckpointWriteError(
                f"checkpoint of step {progress.step} could not be written to {self.root}: {cause}{disk}; nothing "
                f"was committed, the previous checkpoint ({self.store.name_of(previous) if previous else 'none'}) "
                "is intact"
            ) from exc

    def _manifest(
        self,
        directory: Path,
        state: portable.PortableState,
        adapter: DeviceAdapter,
        progress: TrainingProgress,
        config: dict[str, Any],
        digests: dict[str, dict[str, Any]],
    ) -> Manifest:
        header = manifest_header(state, adapter.name, adapter.rng_key(), adapter.describe(), progress, config)
        return Manifest(**header, files=checksum_files(directory, digests), created_at=time.time())

    def has_checkpoints(self) -> bool:
        return bool(self.store.committed())

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        adapter: DeviceAdapter,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        scheduler: Any | None = None,
        extra: dict[str, Any] | None = None,
        clean: bool = True,
    ) -> Restored | None:
        """Restore the newest good checkpoint into the live objects; None when the directory has none.
        ``extra`` is the task's current extra state (the shapes of its tensors); the restored one is returned
        in :attr:`Restored.extra`. ``clean`` first removes the leftovers of interrupted saves: a group's
        members pass False (a save of the group may be in flight; its driver cleans at the start)."""
        if clean:
            self.store.remove_partial()
        candidates = self.store.candidates()
        if not candidates:
            return None
        expected = portable.template(model, optimizer, extra)
        skipped: list[tuple[Path | str, str]] = []
        for ref in candidates:
            with self.store.opened(ref) as path:
                try:
                    manifest = self.store.verify(path)
                    saved = {
                        layout.from_disk(k, manifest.format_version): v for k, v in manifest.tensors.items()
                    }
                    portable.check_compatible(expected, saved, str(ref))
                    loaded = {k: torch.empty_like(t) for k, t in expected.items()}
                    read_tensors(path, loaded, manifest.format_version)
                except CheckpointCorruptError as exc:
                    log.warning("skipping damaged checkpoint %s: %s", ref, exc)
                    skipped.append((ref, str(exc)))
                    continue
                restored_extra = portable.apply(
                    loaded,
                    manifest.optimizer,
                    manifest.scaler,
                    model,
                    optimizer,
                    scaler,
                    manifest.task_state,
                    scheduler,
                )
                rng = self._restore_rng(path, manifest, adapter, device, rank, world_size, seed)
            return Restored(ref, manifest, rng[0], skipped, rng[1], restored_extra)
        raise NoCheckpointError(
            f"no loadable checkpoint in {self.root}; every candidate is damaged: "
            + "; ".join(f"{self.store.name_of(p)}: {why}" for p, why in skipped)
        )

    @staticmethod
    def _restore_rng(
        path: Path,
        manifest: Manifest,
        adapter: DeviceAdapter,
        device: torch.device,
        rank: int,
        world_size: int,
        seed: int,
    ) -> tuple[bool, list[dict[str, Any]]]:
        history = list(manifest.history)
        saved = rng_io.read_rng(path, rank) if manifest.world_size == world_size else None
        if saved is not None and saved[0] == adapter.rng_key():
            adapter.set_rng_state(saved[1], device)
            return True, history
        adapter.seed(rng_io.derive_seed(seed, manifest.step, rank), device)
        if rank == 0:
            history.append(
                {
                    "step": manifest.step,
                    "event": "resumed_elsewhere",
                    "from_family": manifest.family,
                    "to_family": adapter.name,
                    "from_world_size": manifest.world_size,
                    "to_world_size": world_size,
                    "rng": "rederived from (seed, step, rank)",
                    "time": time.time(),
                }
            )
        return False, history


def read_tensors(path: Path, into: dict[str, torch.Tensor], format_version: int) -> None:
    """Load the tensors named by ``into``'s keys from the DCP files of checkpoint ``path`` into its tensors,
    in place, through the restricted reader. ``format_version`` (the manifest's) says which key layout the
    files use. Any failure to read is a CheckpointCorruptError naming ``path``."""
    by_disk_key = {layout.on_disk(k, format_version): t for k, t in into.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                by_disk_key,
                storage_reader=SafeFileSystemReader(path),
                planner=TensorOnlyLoadPlanner(),
                no_dist=True,
            )
    except CheckpointCorruptError:
        raise
    except CheckpointException as exc:
        # DCP wraps errors raised while reading; an unsafe or unreadable item surfaces here.
        failures = _exceptions(exc)
        for failure in failures:
            if not isinstance(failure, Exception):  # KeyboardInterrupt, SystemExit: not damage
                raise failure from None
        inner = [e for e in failures if isinstance(e, CheckpointCorruptError)]
        if inner:
            raise inner[0] from None
        raise CheckpointCorruptError(f"{path}: DCP could not read the tensors ({exc})") from None
    except (RuntimeError, ValueError, OSError, EOFError, AssertionError) as exc:
        # DCP reports a failed metadata read (including a refused unpickle) as an AssertionError.
        raise CheckpointCorruptError(f"{path}: DCP could not read the tensors ({exc})") from None


def write_failure(exc: BaseException) -> BaseException | None:
    """The error that kept the files from being written: an I/O error, or any error of DCP's writers
    (a full disk surfaces there as a RuntimeError of the serialiser). None for anything else."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, CheckpointException):
        failures = [e for e in _exceptions(exc) if isinstance(e, Exception)]
        return next((e for e in failures if isinstance(e, OSError)), failures[0] if failures else exc)
    return None


def _exceptions(exc: CheckpointException) -> list[BaseException]:
    failures = getattr(exc, "failures", {}) or {}
    out: list[BaseException] = []
    for value in failures.values():
        if isinstance(value, BaseException):
            out.append(value)
        # DCP wraps per-rank errors as (exception, traceback) pairs in some versions.
        elif isinstance(value, tuple) and value and isinstance(value[0], BaseException):
            out.append(value[0])
    return out
