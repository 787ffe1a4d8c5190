"""One driver per run: a lease beside the checkpoints, renewed by its holder, fenced at every commit.

A second driver started on the same checkpoint directory — a re-launch while the old driver still runs, a
job submitted twice — finds the lease held and refuses at once (a :class:`LeaseHeldError`, exit code 2),
naming the holder and what to do. A lease whose holder stopped renewing it for ``stale_after_s`` (the
holder died, or its host did) is taken over — at once when the holder ran on this host and its process is
gone — the generation goes up by one and the take-over is journalled.

The lease is a small JSON file, ``<checkpoint dir>/.driver-lease.json``, written aside and put in place
with a rename (taken over) or a hard link (created: fails if one exists), both atomic on local and network
filesystems, where ``flock`` is not to be relied on. Staleness is judged by the time the holder wrote into
it, so the hosts' clocks must agree to within a fraction of ``stale_after_s``.

Fencing: a driver that was paused (a stopped VM, a long GC, a partitioned host) may come back after its
lease was taken over. Every checkpoint commit first checks that the lease file still holds the
committing driver's token (:class:`Fence`, which the driver hands to whichever process commits), and is
refused otherwise; each manifest records the lease generation it was committed under. Between that check
and the rename there is a window of a few system calls: a lease on storage with conditional writes (object
storage's ``If-Match``) would close it; a filesystem cannot.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import CheckpointWriteError, ConfigError

LEASE_NAME = ".driver-lease.json"


class LeaseHeldError(ConfigError):
    """Another live driver holds this run's lease."""


class LeaseLostError(CheckpointWriteError):
    """This driver's lease was taken over by another: it must not commit."""


def _read(path: Path) -> dict[str, Any] | None:
    try:
        body = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


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
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


@dataclass(frozen=True)
class Fence:
    """What a commit checks, in whichever process commits: the lease still holds this driver's token."""

    path: str
    generation: int
    token: str

    def check(self) -> None:
        current = _read(Path(self.path))
        if current is None or current.get("token") != self.token:
            holder = f"now held by {_describe(current)}" if current else "gone"
            raise LeaseLostError(
                f"this driver's lease on {Path(self.path).parent} (generation {self.generation}) was taken over "
                f"— {holder}; the commit is refused so that two drivers never write one run"
            )


class Lease:
    def __init__(self, directory: Path, stale_after_s: float = 30.0, renew_s: float = 5.0) -> None:
        self.path = Path(directory) / LEASE_NAME
        self.stale_after_s, self.renew_s = stale_after_s, renew_s
        self.token = uuid.uuid4().hex
        self.generation = 0
        #: The holder this driver took the lease over from (journalled by the caller); None if it was free.
        self.taken_from: dict[str, Any] | None = None
        #: Set when a renewal finds the lease in another driver's hands.
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fence(self) -> Fence:
        return Fence(str(self.path), self.generation, self.token)

    def _body(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "generation": self.generation,
            "started": getattr(self, "_started", time.time()),
            "renewed": time.time(),
        }

    def _write_aside(self) -> Path:
        tmp = self.path.with_name(f"{LEASE_NAME}.{self.token[:8]}.{uuid.uuid4().hex[:6]}")
        with open(tmp, "w") as f:
            json.dump(self._body(), f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def acquire(self) -> Lease:
        """Take the lease (free, or stale) and start renewing it; raise :class:`LeaseHeldError` if a live
        driver holds it, :class:`ConfigError` if the directory cannot be written."""
        try:
            return self._acquire()
        except OSError as exc:
            raise ConfigError(
                f"checkpoint.dir {self.path.parent}: the driver's lease cannot be written there ({exc}); allowed: "
                "a writable directory"
            ) from None

    def _acquire(self) -> Lease:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        holder = _read(self.path)
        if holder is None and not self.path.exists():
            self.generation = 1
            tmp = self._write_aside()
            try:
                os.link(tmp, self.path)  # fails if another driver created it meanwhile
            except FileExistsError:
                holder = _read(self.path)
            finally:
                tmp.unlink(missing_ok=True)
            if holder is None:
                return self._start()
        holder = holder or {}
        fresh = time.time() - float(holder.get("renewed", 0)) < self.stale_after_s
        if fresh and not _gone(holder):
            raise LeaseHeldError(
                f"checkpoint.dir {self.path.parent} is in use by another driver: {_describe(holder)}; allowed: one "
                f"driver per run — stop that one, or use another hydra.run.dir / checkpoint.dir (a lease not "
                f"renewed for {self.stale_after_s:g} s is taken over)"
            )
        self.generation = int(holder.get("generation", 0)) + 1
        os.replace(self._write_aside(), self.path)
        time.sleep(min(0.2, self.renew_s))  # another driver taking it over at the same moment: one wins
        if (_read(self.path) or {}).get("token") != self.token:
            raise LeaseHeldError(
                f"checkpoint.dir {self.path.parent} was taken over by another driver meanwhile"
            )
        self.taken_from = holder
        return self._start()

    def _start(self) -> Lease:
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            if (_read(self.path) or {}).get("token") != self.token:
                self.lost.set()  # taken over: commits are refused by the fence from now on
                return
            os.replace(self._write_aside(), self.path)

    def release(self) -> None:
        """Stop renewing; remove the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_s + 1)
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
