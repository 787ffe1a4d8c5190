"""One driver per run: a lease beside the checkpoints, renewed by its holder, fenced at every commit.

A second driver started on the same checkpoint directory — a re-launch while the old driver still runs, a
job submitted twice — finds the lease held and refuses at once (a :class:`LeaseHeldError`, exit code 2),
naming the holder and what to do. A lease whose holder stopped renewing it for ``stale_after_s`` (the
holder died, or its host did) is taken over — at once when the holder ran on this host and its process is
gone — the generation goes up by one and the take-over is journalled.

The lease is a small JSON file, ``<checkpoint dir>/.driver-lease.json``, written aside and put in place
with a rename (taken over) or a hard link (created: fails if one exists), both atomic on local and network
filesystems, where ``flock`` is not to be relied on. On object storage it is an object beside the
checkpoints, created with ``If-None-Match: *`` and renewed or taken over with ``If-Match: <ETag>``
(:class:`ObjectSlot`), so of two drivers racing for it exactly one wins. Staleness is judged by the time the holder wrote into
it, so the hosts' clocks must agree to within a fraction of ``stale_after_s``.

Fencing: a driver that was paused (a stopped VM, a long GC, a partitioned host) may come back after its
lease was taken over. Every checkpoint commit first checks that the lease file still holds the
committing driver's token (:class:`Fence`, which the driver hands to whichever process commits), and is
refused otherwise; each manifest records the lease generation it was committed under. On a filesystem,
between that check and the rename there is a window of a few calls. On object storage there is none: S3
conditions a write only on the object written, so the commit is a conditional write of the one object every
holder writes, ``latest``, which a new holder claims at its start (:mod:`trainer.checkpoint.pointer`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import CheckpointWriteError, ConfigError

LEASE_NAME = ".driver-lease.json"

log = logging.getLogger(__name__)


class LeaseHeldError(ConfigError):
    """Another live driver holds this run's lease."""


class LeaseLostError(CheckpointWriteError):
    """This driver's lease was taken over by another: it must not commit."""


def _parse(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return _parse(path.read_bytes())
    except FileNotFoundError:
        return None


class FileSlot:
    """The lease as a file: created with a hard link (fails if one exists), replaced with a rename."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LEASE_NAME
        self.where = str(directory)

    def prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        return _read(self.path), None

    def exists(self) -> bool:
        return self.path.exists()

    def _aside(self, body: dict[str, Any]) -> Path:
        tmp = self.path.with_name(f"{LEASE_NAME}.{str(body['token'])[:8]}.{uuid.uuid4().hex[:6]}")
        with open(tmp, "w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, body: dict[str, Any]) -> bool:
        tmp = self._aside(body)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def swap(self, body: dict[str, Any], version: str | None) -> bool:
        """Replace the lease (a filesystem cannot condition this on ``version``: the caller re-reads)."""
        os.replace(self._aside(body), self.path)
        return True

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class ObjectSlot:
    """The lease as an object: created with ``If-None-Match: *``, replaced with ``If-Match: <ETag>``, so
    two drivers racing for it cannot both win."""

    def __init__(self, fs: Any, base: str, url: str) -> None:
        self.fs, self.key, self.where = fs, f"{base}/{LEASE_NAME}", url

    def prepare(self) -> None:
        """Nothing to create on object storage. A missing bucket or refused credentials are found before a
        run by ``ObjectStore.check``, and otherwise surface as the error of the first write."""

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        self.fs.invalidate_cache(self.key)
        try:
            etag = str(self.fs.info(self.key).get("ETag", ""))
            data = self.fs.cat_file(self.key)
        except FileNotFoundError:
            return None, None
        return _parse(data), etag

    def exists(self) -> bool:
        return self.read()[1] is not None

    def create(self, body: dict[str, Any]) -> bool:
        try:
            self.fs.pipe(self.key, json.dumps(body).encode(), mode="create")
        except FileExistsError:
            return False
        return True

    def swap(self, body: dict[str, Any], version: str | None) -> bool:
        try:
            self.fs.pipe(self.key, json.dumps(body).encode(), IfMatch=version)
        except (FileExistsError, FileNotFoundError):  # 412 Precondition Failed / gone meanwhile
            return False
        except OSError as exc:
            if re.search(r"pre-?condition|412", str(exc), re.IGNORECASE):  # s3fs words it as EINVAL
                return False
            raise
        return True

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key)


Slot = FileSlot | ObjectSlot


def _describe(holder: dict[str, Any]) -> str:
    age = time.time() - float(holder.get("renewed", 0))
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} (lease generation {holder.get('generation')}, "
        f"renewed {age:.0f} s ago)"
    )


def _gone(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (a killed driver re-launched here): its lease
    need not go stale first. Elsewhere only staleness tells."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return not pid_alive(holder["pid"])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Fence:
    """What a commit checks, in whichever process commits: the lease still holds this driver's token.
    ``where``: the checkpoint directory or URL the lease lives in (for messages)."""

    where: str
    generation: int
    token: str

    def check(self, slot: Slot | None = None) -> None:
        """Raise :class:`LeaseLostError` unless the lease in ``slot`` (default: the file in ``where``)
        still holds this token."""
        current = (slot or FileSlot(Path(self.where))).read()[0]
        if current is None or current.get("token") != self.token:
            holder = f"now held by {_describe(current)}" if current else "gone"
            raise LeaseLostError(
                f"this driver's lease on {self.where} (generation {self.generation}) was taken over "
                f"— {holder}; the commit is refused so that two drivers never write one run"
            )


class Lease:
    def __init__(self, slot: Slot | Path, stale_after_s: float = 30.0, renew_s: float = 5.0) -> None:
        """``slot``: where the lease lives (a checkpoint directory's :class:`FileSlot`, given as the
        directory's path, or an object store's :class:`ObjectSlot`)."""
        self.slot = slot if isinstance(slot, FileSlot | ObjectSlot) else FileSlot(slot)
        self.stale_after_s, self.renew_s = stale_after_s, renew_s
        self.token = uuid.uuid4().hex
        self.generation = 0
        self._started = time.time()
        #: The holder this driver took the lease over from (journalled by the caller); None if it was free.
        self.taken_from: dict[str, Any] | None = None
        #: Set when a renewal finds the lease in another driver's hands.
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fence(self) -> Fence:
        return Fence(self.slot.where, self.generation, self.token)

    def _body(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "generation": self.generation,
            "started": self._started,
            "renewed": time.time(),
        }

    def acquire(self) -> Lease:
        """Take the lease (free, or stale) and start renewing it; raise :class:`LeaseHeldError` if a live
        driver holds it, :class:`ConfigError` if the location cannot be written."""
        try:
            return self._acquire()
        except (OSError, PermissionError) as exc:
            raise ConfigError(
                f"checkpoint.dir {self.slot.where}: the driver's lease cannot be written there "
                f"({type(exc).__name__}: {exc}); allowed: a writable directory or bucket"
            ) from None

    def _acquire(self) -> Lease:
        self.slot.prepare()
        self._started = time.time()
        holder, version = self.slot.read()
        if holder is None and version is None and not self.slot.exists():
            self.generation = 1
            if self.slot.create(self._body()):
                return self._start()
            holder, version = self.slot.read()
        holder = holder or {}
        fresh = time.time() - float(holder.get("renewed", 0)) < self.stale_after_s
        if fresh and not _gone(holder):
            raise LeaseHeldError(
                f"checkpoint.dir {self.slot.where} is in use by another driver: {_describe(holder)}; allowed: "
                f"one driver per run — stop that one, or use another hydra.run.dir / checkpoint.dir (a lease "
                f"not renewed for {self.stale_after_s:g} s is taken over)"
            )
        self.generation = int(holder.get("generation", 0)) + 1
        won = self.slot.swap(self._body(), version)
        if isinstance(self.slot, FileSlot):
            time.sleep(min(0.2, self.renew_s))  # another driver taking it over at the same moment: one wins
        if not won or (self.slot.read()[0] or {}).get("token") != self.token:
            raise LeaseHeldError(
                f"checkpoint.dir {self.slot.where} was taken over by another driver meanwhile"
            )
        self.taken_from = holder
        return self._start()

    def _start(self) -> Lease:
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                current, version = self.slot.read()
                mine = (current or {}).get("token") == self.token
                if not mine or not self.slot.swap(self._body(), version):
                    self.lost.set()  # taken over: commits are refused by the fence from now on
                    return
            except OSError as exc:  # storage unreachable for a moment: the next renewal tries again
                log.warning("renewing the driver's lease on %s failed: %s", self.slot.where, exc)

    def release(self) -> None:
        """Stop renewing; remove the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_s + 1)
        with contextlib.suppress(OSError):
            if (self.slot.read()[0] or {}).get("token") == self.token:
                self.slot.delete()
