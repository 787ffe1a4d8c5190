"""Checkpoints on object storage (``checkpoint.dir=s3://bucket/prefix``), with the guarantees of the disk.

Layout under the URL::

    <url>/latest                          the newest and every committed checkpoint, its owner (pointer.py)
    <url>/step_000000040/manifest.json    uploaded last, then the checkpoint is listed in latest
    <url>/step_000000040/...              DCP files and rng/, uploaded first
    <url>/.driver-lease.json              the driver's lease (trainer.checkpoint.lease), conditional writes

Object storage has no rename: a checkpoint is written into a local spool directory exactly as on disk
(DCP, RNG, digests); every object is uploaded create-only (``If-None-Match: *``) under a name no object
uses yet, the manifest last, so nothing is ever overwritten; the commit is listing it in ``latest`` with a
conditional PUT (``If-Match``), which a driver whose lease was taken over cannot make (see pointer.py). An
upload killed mid-way is not listed: invisible, removed on the next start. Retention deletes the manifest
first. A checkpoint is loaded from a local copy (node_copy.py), every file verified against the manifest.

Credentials come from ``checkpoint.storage_options`` (passed to s3fs: ``endpoint_url``, ``key``,
``secret``, ``token``…) or from the usual AWS environment and instance metadata; the manifests keep the
configuration with those values redacted (see :func:`trainer.checkpoint.locations.redact`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from trainer.checkpoint.lease import Fence, ObjectSlot, pid_alive
from trainer.checkpoint.locations import check_location, filesystem
from trainer.checkpoint.manifest import MANIFEST_NAME, Manifest
from trainer.checkpoint.node_copy import shared_copy
from trainer.checkpoint.pointer import LatestObject, precondition_failed
from trainer.checkpoint.store import LATEST, NAME, best_first, sort_key, verify_dir
from trainer.errors import CheckpointCorruptError, CheckpointWriteError, ConfigError

log = logging.getLogger(__name__)

#: Seconds :meth:`ObjectStore.check` waits for the store to answer before a run starts.
PREFLIGHT_TIMEOUT_S = 30.0


def _spool_root() -> Path:
    return Path(tempfile.gettempdir()) / "fleet-trainer-spool"


class ObjectStore:
    """The same interface as :class:`trainer.checkpoint.store.CheckpointStore`, over an fsspec URL.
    Checkpoints are named by their URL (``s3://bucket/prefix/step_000000040``)."""

    def __init__(self, url: str, keep_last: int = 3, storage_options: dict[str, Any] | None = None) -> None:
        check_location(url)
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.fs, self.base = filesystem(self.url, storage_options)
        #: The committing driver's lease (trainer.checkpoint.lease.Fence): checked before a commit.
        self.fence: Fence | None = None
        #: This process's local directory for saves being written and checkpoints being read.
        self.spool = _spool_root() / f"p{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pointer = LatestObject(self.fs, self._key(LATEST), self.url)

    def __str__(self) -> str:
        return self.url

    def _key(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def name_of(self, ref: str | Path) -> str:
        return PurePosixPath(str(ref)).name

    # --- writing -------------------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh local directory to write the checkpoint of ``step`` into before it is uploaded."""
        tmp = self.spool / f".tmp-step_{step:09d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, manifest: Manifest) -> str:
        """Upload ``tmp`` under a fresh name, the manifest last and create-only, move ``latest``; returns the
        checkpoint's URL (:meth:`retain` then removes old ones). A driver whose lease was taken over is
        refused."""
        if self.fence is not None:
            self.fence.check(self.lease_slot())
        name = self._free_name(manifest.step)
        self.upload(tmp, name, [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()])
        url = self.publish(name, manifest)
        shutil.rmtree(tmp, ignore_errors=True)
        return url

    def reserve(self, step: int) -> str:
        """A name no object uses yet, for a checkpoint of ``step`` whose files several writers upload
        (:meth:`upload`) before one party commits it (:meth:`publish`); the caller's saves never overlap."""
        return self._free_name(step)

    def scratch(self) -> Path:
        """A fresh local directory in this process's spool, for files on their way up."""
        path = self.spool / f".tmp-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def upload(self, local: Path, name: str, files: list[str]) -> None:
        """Upload ``files`` (paths relative to ``local``) under checkpoint ``name``: invisible to readers
        until :meth:`publish` commits it. Create-only: an object already there (a driver paused past a
        take-over, writing into a name the new holder has used since) is never overwritten."""
        sources, targets = [str(local / f) for f in files], [self._key(name, f) for f in files]
        try:
            if files:
                self.fs.put(sources, targets, mode="create")
        except OSError as exc:
            if not precondition_failed(exc):
                raise
            raise CheckpointWriteError(
                f"{self.url}/{name}: another writer uploaded under this name meanwhile ({exc}); nothing was "
                "overwritten"
            ) from None

    def uploaded(self, name: str) -> dict[str, int]:
        """``{path relative to the checkpoint: size}`` of every object under checkpoint ``name``."""
        prefix = self._key(name)
        self.fs.invalidate_cache(prefix)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {str(k)[len(prefix) + 1 :]: int(info["size"]) for k, info in found.items()}

    def publish(self, name: str, manifest: Manifest) -> str:
        """Commit checkpoint ``name``, whose other files are uploaded: its manifest goes up create-only, then
        ``latest`` lists it, conditionally; returns its URL. A driver whose lease was taken over is refused,
        by the lease before and by ``latest`` at the commit; what it uploaded stays unlisted, invisible, until
        the next start removes it (not deleted here: the new holder may since have taken the name)."""
        if self.fence is not None:
            self.fence.check(self.lease_slot())
            manifest.lease_generation = self.fence.generation
        try:
            self.fs.pipe(self._key(name, MANIFEST_NAME), manifest.to_json().encode(), mode="create")
        except FileExistsError as exc:
            raise CheckpointWriteError(
                f"{self.url}/{name}: another writer committed this name meanwhile ({exc}); nothing was overwritten"
            ) from None
        self.pointer.advance(self.fence, name, self._manifest_names)
        return f"{self.url}/{name}"

    def claim(self, fence: Fence) -> None:
        """Called by the driver once it holds the lease behind ``fence``, before restoring: ``latest`` becomes
        this driver's, and no commit of an earlier holder can become visible any more."""
        self.pointer.claim(fence, self.lease_slot(), self._manifest_names)

    def discard(self, name: str) -> None:
        """Delete the uploaded objects of checkpoint ``name``, which was never published."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._key(name), recursive=True)

    def abandon(self, tmp: Path) -> None:
        """Remove a save that failed before commit (its local files; uploaded objects without a manifest
        are invisible and removed by :meth:`remove_partial`)."""
        shutil.rmtree(tmp, ignore_errors=True)

    def _free_name(self, step: int) -> str:
        taken = self._prefixes()
        base = f"step_{step:09d}"
        if base not in taken:
            return base
        n = 1
        while f"{base}.{n}" in taken:
            n += 1
        return f"{base}.{n}"

    def retain(self, keep: Path | str) -> None:
        """Delete all but the newest ``keep_last`` committed checkpoints (manifest first), never ``keep``
        (a checkpoint's URL or name)."""
        name = self.name_of(keep)
        for old in self._committed_names()[: -self.keep_last]:
            if old == name:
                continue
            self.fs.rm_file(self._key(old, MANIFEST_NAME))  # un-commit first
            self.fs.rm(self._key(old), recursive=True)

    def remove_partial(self) -> list[str]:
        """Delete uploads that never committed and the spools of processes that are gone; returns the
        URLs removed."""
        removed = []
        committed = set(self._committed_names())
        for name in sorted(self._prefixes() - committed):
            self.fs.rm(self._key(name), recursive=True)
            removed.append(f"{self.url}/{name}")
        root = _spool_root()
        if root.is_dir():
            for spool in root.iterdir():
                match = re.match(r"^p(\d+)-", spool.name)
                if match and not pid_alive(int(match.group(1))):
                    shutil.rmtree(spool, ignore_errors=True)
        return removed

    # --- reading -------------------------------------------------------------------------------------
    def _listing(self) -> list[str]:
        """Every object key under the URL, up to two levels deep (fresh: the listing cache is dropped)."""
        self.fs.invalidate_cache(self.base)
        try:
            return [str(k) for k in self.fs.find(self.base, maxdepth=2)]
        except FileNotFoundError:
            return []

    def _prefixes(self) -> set[str]:
        """Names of checkpoint prefixes holding any object, committed or not."""
        out = set()
        for key in self._listing():
            parts = key[len(self.base) + 1 :].split("/")
            if len(parts) > 1 and NAME.match(parts[0]):
                out.add(parts[0])
        return out

    def _manifest_names(self) -> list[str]:
        """Names of the checkpoints whose manifest is up, oldest first (committed or not: see ``latest``)."""
        names = set()
        for key in self._listing():
            parts = key[len(self.base) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST_NAME and NAME.match(parts[0]):
                names.add(parts[0])
        return sorted(names, key=sort_key)

    def _committed_names(self) -> list[str]:
        """The checkpoints ``latest`` lists whose manifest is up, oldest first."""
        return sorted(self.pointer.listed(self.pointer.read()[0], self._manifest_names()), key=sort_key)

    def committed(self) -> list[str]:
        """URLs of the committed checkpoints, oldest first."""
        return [f"{self.url}/{n}" for n in self._committed_names()]

    def latest_pointer(self) -> str | None:
        """Where ``latest`` points, or None (absent, unreadable or dangling — with a warning)."""
        try:
            pointer, etag = self.pointer.read()
        except OSError as exc:
            log.warning("%s/%s is unreadable (%s); scanning instead", self.url, LATEST, exc)
            return None
        if pointer is None and etag is not None:
            log.warning("%s/%s is not a pointer; scanning instead", self.url, LATEST)
        if pointer is None or pointer.latest is None:
            return None
        name = pointer.latest
        if not NAME.match(name) or name not in self._committed_names():
            log.warning(
                "%s/%s points to %r, not a committed checkpoint; scanning instead", self.url, LATEST, name
            )
            return None
        return f"{self.url}/{name}"

    def candidates(self) -> list[str]:
        """Checkpoints to try, best first: the ``latest`` target, then the others newest first."""
        return best_first(self.committed(), self.latest_pointer())

    @contextlib.contextmanager
    def opened(self, ref: str | Path) -> Iterator[Path]:
        """A local copy of checkpoint ``ref``: downloaded into the host's spool once for all the processes
        of this host that hold it open at the same time (a group's ranks restoring), removed after the last."""
        name = self.name_of(ref)

        def download(local: Path) -> None:
            prefix = self._key(name)
            keys = [str(k) for k in self.fs.find(prefix)]
            if keys:
                self.fs.get(keys, [str(local / k[len(prefix) + 1 :]) for k in keys])

        with shared_copy(_spool_root(), f"{self.url}/{name}", name, download) as local:
            yield local

    def verify(self, path: Path) -> Manifest:
        """The manifest of a downloaded checkpoint after checking it and every file it lists (errors name
        the checkpoint's URL, not the local copy)."""
        try:
            return verify_dir(path)
        except CheckpointCorruptError as exc:
            raise CheckpointCorruptError(str(exc).replace(str(path), f"{self.url}/{path.name}")) from None

    def check(self, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
        """Before a run starts: the bucket exists, and an object can be written under the URL and deleted,
        within ``timeout_s``; else a :class:`ConfigError` naming ``checkpoint.dir`` and the cause."""
        outcome: list[BaseException | None] = []
        stage = ["reaching the bucket"]

        def attempt() -> None:
            try:
                bucket = self.base.split("/", 1)[0]
                try:  # not fs.exists: it answers False for an endpoint that does not answer at all
                    self.fs.call_s3("head_bucket", Bucket=bucket)
                except FileNotFoundError:
                    raise FileNotFoundError(f"the bucket {bucket!r} does not exist") from None
                stage[0] = "writing under the URL"
                probe = self._key(f".write-check-{uuid.uuid4().hex[:8]}")
                self.fs.pipe(probe, b"")
                self.fs.rm_file(probe)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=attempt, name="checkpoint-dir-check", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if not outcome:
            cause = f"no answer within {timeout_s:g} s (endpoint unreachable?)"
        elif outcome[0] is None:
            return
        elif isinstance(outcome[0], PermissionError) and stage[0] == "reaching the bucket":
            cause = f"the credentials are refused, or grant no access to the bucket ({outcome[0]})"
        elif isinstance(outcome[0], PermissionError):
            cause = f"read-only for these credentials: writing is denied ({outcome[0]})"
        elif isinstance(outcome[0], FileNotFoundError):
            cause = str(outcome[0]).strip("'\"")
        else:
            cause = f"unreachable or refused while {stage[0]}: {type(outcome[0]).__name__}: {outcome[0]}"
        raise ConfigError(
            f"checkpoint.dir {self.url}: {cause}; allowed: an existing bucket that these credentials can "
            "write (checkpoint.storage_options or the AWS environment)"
        )

    def lease_slot(self) -> ObjectSlot:
        """Where the driver's lease lives: an object beside the checkpoints, written conditionally."""
        return ObjectSlot(self.fs, self.base, self.url)
