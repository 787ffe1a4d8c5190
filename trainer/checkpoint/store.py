"""The checkpoint directory: atomic commits, the ``latest`` pointer, retention, and finding good ones.

Layout::

    <dir>/latest                  name of the newest committed checkpoint (replaced atomically)
    <dir>/step_000000040/         a committed checkpoint: manifest.json, DCP files, rng/
    <dir>/.tmp-step_000000060-*/  a save in progress; never read, removed on the next start

A checkpoint directory becomes visible under its final name only by ``rename`` after every file in it,
the directory itself and the manifest are fsynced; ``latest`` moves after that. Nothing is overwritten in
place: a second checkpoint of the same step gets a ``.1``, ``.2``… suffix, and retention deletes by
renaming aside first, so a half-deleted directory never looks committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from trainer.checkpoint.lease import Fence, FileSlot
from trainer.checkpoint.manifest import Manifest
from trainer.errors import CheckpointCorruptError

log = logging.getLogger(__name__)

LATEST = "latest"
#: A checkpoint's name in a store: its directory, or its URL on object storage.
Ref = TypeVar("Ref", Path, str)
NAME = re.compile(r"^step_(\d{9})(?:\.(\d+))?$")


def fsync_path(path: Path | str) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def sort_key(path: Path | str) -> tuple[int, int]:
    """Checkpoints in order: by step, then by the ``.N`` suffix of a second save of one step."""
    match = NAME.match(Path(path).name)
    assert match is not None
    return int(match.group(1)), int(match.group(2) or 0)


class CheckpointStore:
    def __init__(self, root: Path, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        #: The committing driver's lease (trainer.lease.Fence): checked before a commit becomes visible.
        self.fence: Fence | None = None

    def __str__(self) -> str:
        return str(self.root)

    def name_of(self, ref: str | Path) -> str:
        return Path(ref).name

    def lease_slot(self) -> FileSlot:
        """Where the driver's lease lives: a file beside the checkpoints."""
        return FileSlot(self.root)

    # --- writing -------------------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh private directory to write the checkpoint of ``step`` into."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step_{step:09d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, manifest: Manifest) -> Path:
        """Seal ``tmp`` with ``manifest``, rename it into place, move ``latest``; :meth:`retain` then
        removes the old ones. With a fence, a driver whose lease was taken over is refused
        (:class:`LeaseLostError`), before and after the write."""
        if self.fence is not None:
            self.fence.check()
            manifest.lease_generation = self.fence.generation
        manifest.write(tmp)
        _fsync_tree(tmp)
        final = self._free_name(manifest.step)
        if self.fence is not None:
            self.fence.check()
        os.rename(tmp, final)
        fsync_path(self.root)
        self._point_latest(final.name)
        return final

    def abandon(self, tmp: Path) -> None:
        """Remove a save that failed before commit."""
        shutil.rmtree(tmp, ignore_errors=True)

    def _free_name(self, step: int) -> Path:
        base = self.root / f"step_{step:09d}"
        if not base.exists():
            return base
        n = 1
        while (self.root / f"{base.name}.{n}").exists():
            n += 1
        return self.root / f"{base.name}.{n}"

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        fsync_path(self.root)

    def retain(self, keep: Path | str) -> None:
        """Delete all but the newest ``keep_last`` committed checkpoints, never ``keep``. Separate from
        the commit so that an asynchronous save is reported committed before the (slow, on a disk that
        discards freed blocks) deletion of the old ones."""
        keep = Path(keep)
        for old in self.committed()[: -self.keep_last]:
            if old == keep:
                continue
            trash = self.root / f".trash-{old.name}-{uuid.uuid4().hex[:8]}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def remove_partial(self) -> list[Path]:
        """Delete leftovers of interrupted saves and deletions; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith((".tmp-", ".trash-", f".{LATEST}.")):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    # --- reading -------------------------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name)), key=sort_key)

    def latest_pointer(self) -> Path | None:
        """Where ``latest`` points, or None (absent, unreadable or dangling — with a warning)."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("%s is unreadable (%s); scanning %s instead", pointer, exc, self.root)
            return None
        target = self.root / name
        if not NAME.match(name) or not target.is_dir():
            log.warning(
                "%s points to %r, which is not a committed checkpoint; scanning instead", pointer, name
            )
            return None
        return target

    def candidates(self) -> list[Path]:
        """Checkpoints to try, best first: the ``latest`` target, then the others newest first."""
        return best_first(self.committed(), self.latest_pointer())

    @contextlib.contextmanager
    def opened(self, ref: str | Path) -> Iterator[Path]:
        """Checkpoint ``ref`` as a local directory: itself, on disk."""
        yield Path(ref)

    def verify(self, path: Path) -> Manifest:
        return verify_dir(path)


def best_first(committed: list[Ref], latest: Ref | None) -> list[Ref]:
    """``committed`` (oldest first) in the order to try them: ``latest``'s target, then newest first."""
    ordered = list(reversed(committed))
    if latest is not None and latest in ordered:
        ordered.remove(latest)
        ordered.insert(0, latest)
    return ordered


def verify_dir(path: Path) -> Manifest:
    """The manifest of checkpoint directory ``path`` after checking it and every file it lists; raises
    CheckpointCorruptError."""
    manifest = Manifest.read(path)
    manifest.verify_files(path)
    match = NAME.match(path.name)
    if match is None or int(match.group(1)) != manifest.step:
        raise CheckpointCorruptError(f"{path}: directory name does not match manifest step {manifest.step}")
    return manifest
