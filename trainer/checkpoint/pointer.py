"""The ``latest`` object of a checkpoint URL: the commit point on object storage, fenced by its owner.

A driver whose lease was taken over while it was paused may come back between its last look at the lease
and its next write. S3 conditions a write only on the object written, so a check of the lease object cannot
fence an upload of a manifest. The commit is therefore the conditional replacement of one object that every
owner writes: ``latest``. It names the newest checkpoint (first line, as before), the owner and lease
generation that wrote it, and every committed checkpoint::

    step_000000040
    generation 2
    owner 5f0c…            (the lease token of the driver that claimed the run)
    committed step_000000030 step_000000040

- A driver claims ``latest`` right after taking the lease, before it restores: it rewrites the object
  with its own token, conditionally on the version it read (``If-Match: <ETag>``).
- A commit reads ``latest``, refuses if another driver claimed it since, and replaces it conditionally on
  the version it read. A claim that lands between the two makes the replacement fail (the ETag changed:
  the token in the body makes every claim's content new); one that landed before is seen in the read. So
  once the new owner's claim is in, no commit of the previous owner can become visible.
- A checkpoint whose manifest is up but which ``latest`` does not list is not committed: readers pass it
  over, the next driver's start removes it (a refused driver leaves it: the name may be the new owner's).

A ``latest`` without a ``committed`` line (written before this format, or by hand) lists nothing: then every
checkpoint with a manifest counts, as before, until the next claim or commit writes the list.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer.checkpoint.lease import Fence, LeaseLostError, ObjectSlot
from trainer.errors import CheckpointWriteError

#: Conditional replacements tried before a commit or claim gives up (each loses only to another write).
ATTEMPTS = 8


@dataclass
class Pointer:
    """What ``latest`` says. ``committed`` None: a pointer without the list (every manifest counts)."""

    latest: str | None
    committed: list[str] | None = None
    generation: int = 0
    owner: str | None = None

    def encode(self) -> bytes:
        lines = [self.latest or "", f"generation {self.generation}"]
        if self.owner:
            lines.append(f"owner {self.owner}")
        lines.append(" ".join(["committed", *(self.committed or [])]))
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Pointer:
        """Raises ValueError (UnicodeDecodeError included) on a body that is not a pointer."""
        first, *rest = data.decode().split("\n")
        pointer = cls(first.strip() or None)
        for line in rest:
            key, _, value = line.strip().partition(" ")
            if key == "generation":
                pointer.generation = int(value)
            elif key == "owner":
                pointer.owner = value.strip() or None
            elif key == "committed":
                pointer.committed = value.split()
        return pointer


def precondition_failed(exc: OSError) -> bool:
    """Whether an S3 error is a failed condition of a write (412: s3fs raises FileExistsError for
    ``If-None-Match``, and words ``If-Match`` as EINVAL)."""
    return isinstance(exc, FileExistsError) or bool(re.search(r"pre-?condition|412", str(exc), re.IGNORECASE))


class LatestObject:
    """``latest`` on object storage, replaced only conditionally on the version read (see the module)."""

    def __init__(self, fs: Any, key: str, url: str) -> None:
        self.fs, self.key, self.url = fs, key, url

    def read(self) -> tuple[Pointer | None, str | None]:
        """The pointer and its ETag; (None, None) when absent; (None, ETag) when it is no pointer."""
        self.fs.invalidate_cache(self.key)
        try:
            etag = str(self.fs.info(self.key)["ETag"])
            data = self.fs.cat_file(self.key)
        except FileNotFoundError:
            return None, None
        try:
            return Pointer.decode(data), etag
        except ValueError:
            return None, etag

    def _replace(self, pointer: Pointer, etag: str | None) -> bool:
        """Write ``pointer`` if ``latest`` is still at ``etag`` (absent: ``None``); False if it moved."""
        try:
            if etag is None:
                self.fs.pipe(self.key, pointer.encode(), mode="create")
            else:
                self.fs.pipe(self.key, pointer.encode(), IfMatch=etag)
        except OSError as exc:
            if precondition_failed(exc) or isinstance(exc, FileNotFoundError):  # moved, or gone meanwhile
                return False
            raise
        return True

    def claim(self, fence: Fence, lease: ObjectSlot, present: Callable[[], list[str]]) -> Pointer:
        """Make ``latest`` this driver's (at the start, before restoring): from now on a commit of any
        earlier owner is refused. ``lease``: where the lease behind ``fence`` lives; ``present``: names of
        the checkpoints whose manifest is up, oldest first."""
        for _ in range(ATTEMPTS):
            current, etag = self.read()
            fence.check(lease)  # after the read: a take-over after this check moves the ETag, fails the write
            mine = self.listed(current, present())
            latest = current.latest if current and current.latest in mine else (mine[-1] if mine else None)
            pointer = Pointer(latest, mine, fence.generation, fence.token)
            if self._replace(pointer, etag):
                return pointer
        raise CheckpointWriteError(f"{self.url}/latest kept changing while this driver claimed it")

    def advance(self, fence: Fence | None, name: str, present: Callable[[], list[str]]) -> None:
        """Commit checkpoint ``name`` (its manifest is up): list it in ``latest`` and point there. Raises
        :class:`LeaseLostError` when another driver claimed ``latest`` since this one did."""
        for _ in range(ATTEMPTS):
            current, etag = self.read()
            owner = current.owner if current else None
            if fence is not None and owner not in (None, fence.token):
                raise LeaseLostError(
                    f"{self.url}/latest was claimed by the driver of lease generation "
                    f"{current.generation if current else '?'} after this one's (generation "
                    f"{fence.generation}) took it; the commit of {name} is refused"
                )
            listed = [n for n in self.listed(current, present()) if n != name] + [name]
            generation = fence.generation if fence is not None else (current.generation if current else 0)
            pointer = Pointer(name, listed, generation, fence.token if fence is not None else owner)
            if self._replace(pointer, etag):
                return
        raise CheckpointWriteError(f"{self.url}/latest kept changing while {name} was committed")

    @staticmethod
    def listed(current: Pointer | None, present: list[str]) -> list[str]:
        """The committed checkpoints: those ``current`` lists (every one present when it lists none) that
        still have their manifest, in its order."""
        if current is None or current.committed is None:
            return list(present)
        return [n for n in current.committed if n in set(present)]
