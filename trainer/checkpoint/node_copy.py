"""One download per host: processes of one host that open the same checkpoint on object storage at the
same time — the ranks of a Ray group restoring it — share one local copy instead of each fetching it.

The copy lives under the host's spool, keyed by the checkpoint's URL. An exclusive ``flock`` on a lock file
beside it orders the processes (the spool is local to the host, where ``flock`` is reliable): the first one
downloads while the others wait, then each registers as a reader; the last reader to leave removes the
copy, and a later one downloads again. A reader killed on its way leaves its mark behind: marks of processes
that are gone do not count. A download killed mid-way leaves a temporary directory that the next download
removes. Each reader still verifies the copy against its manifest before a tensor is read.

The lock files (empty, one per checkpoint opened on the host) stay: removing a lock file that another
process may be about to lock would let two processes hold "the" lock at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from trainer.checkpoint.lease import pid_alive


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _live(mark: Path) -> bool:
    pid = mark.name.split("-", 1)[0]
    return not pid.isdigit() or pid_alive(int(pid))


@contextlib.contextmanager
def shared_copy(spool: Path, url: str, name: str, download: Callable[[Path], None]) -> Iterator[Path]:
    """A local copy of the checkpoint at ``url`` (its last part ``name``), shared with the other processes of
    this host that hold it open; ``download(directory)`` fetches it into an empty directory when none does."""
    shared = spool / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(url.encode()).hexdigest()[:24]
    entry, lock = shared / key, shared / f"{key}.lock"
    mark = entry / "readers" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with _locked(lock):
        if not entry.exists():  # an entry exists only complete: it is renamed into place
            for leftover in shared.glob(f"{key}.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            tmp = shared / f"{key}.tmp-{uuid.uuid4().hex[:8]}"
            (tmp / "copy" / name).mkdir(parents=True)
            (tmp / "readers").mkdir()
            try:
                download(tmp / "copy" / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.rename(tmp, entry)
        mark.touch()
    try:
        yield entry / "copy" / name
    finally:
        with _locked(lock):
            mark.unlink(missing_ok=True)
            if not any(_live(m) for m in (entry / "readers").iterdir()):
                aside = shared / f"{key}.tmp-{uuid.uuid4().hex[:8]}"
                os.rename(entry, aside)  # at once: no half-removed copy is ever found in place
                shutil.rmtree(aside, ignore_errors=True)
