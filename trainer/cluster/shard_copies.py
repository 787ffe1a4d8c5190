"""Every rank's copy of its own shards, held by the driver: a lost FSDP rank recovers without the disk.

With sharded state (``train.parallelism=fsdp``) no member holds the state whole and a group that lost a rank
cannot gather it, so there is no peer snapshot to repair from (:mod:`trainer.cluster.newest_state`).
Instead, at a chunk end at least ``fault_tolerance.shard_copy_interval_steps`` steps after the previous copy,
every rank copies what it holds itself to host memory (:func:`trainer.shard_copy.take`: its local shards, the
replicated tensors, the non-tensor state and its RNG state) and returns it from an actor call. An actor
call's return value is owned by the caller, so the driver owns every copy: a rank SIGKILLed afterwards takes
its process with it, not its copy. The previous set is released once the new one is complete, so at most two
sets exist, and only while a refresh is in flight.

On a lost rank, the repair in place (:mod:`trainer.cluster.recovery`) asks :meth:`KeptShardCopies.held` for
a complete set — every rank, one step S, the group's world size and family, S not older than the newest
checkpoint — and every member of the re-formed group loads its own rank's copy: the replacement the lost
rank's, the survivors theirs (the join re-shards a fresh model in the new group, so a survivor's live
shards do not outlive the re-formation; its copy of S is the same state). The group goes on from S without
reading the disk. Anything else — no complete set, another world size or family, a checkpoint newer than
the set, a copy lost — falls back to the newest checkpoint, as before.

Costs, and what survives:

- Memory: one host copy of each rank's shards (about the run's state divided by the world size, plus the
  replicated tensors) in Ray's object store per rank, two while a refresh is in flight. Copies under Ray's
  inline limit (100 KiB) are held in the driver's own memory instead.
- Time: each refresh blocks the group for one host copy of its shards and its write into the object store
  (the driver waits for every rank's receipt before the next chunk, so no step changes a tensor being
  copied). Journalled as ``shard_copies`` events (``copy_s``, ``bytes``).
- Where: a copy lives in the object store of the node of the rank that made it. A lost process (SIGKILL, a
  crash) leaves it there; a lost node takes its ranks' copies with it, the set is then incomplete and the
  recovery reads the newest checkpoint (a buddy copy on another node is not kept in this version).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from trainer.cluster import calls
from trainer.cluster.newest_state import HeldState
from trainer.config import Config
from trainer.journal import Journal

log = logging.getLogger(__name__)

#: Seconds every rank may take to hand its copy over before the refresh is given up (the set kept is the
#: previous one; a rank that hangs is the next chunk's to detect).
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class _CopySet:
    step: int
    family: str
    #: Rank → the object holding that rank's copy (owned by the driver).
    refs: tuple[Any, ...]


class ShardCopies:
    """No shard copies (DDP, or ``fault_tolerance.shard_copy_interval_steps=0``): nothing is taken, a lost
    FSDP rank's group is restored from the newest checkpoint."""

    #: Why no set can be used, for the ``recovered`` event's ``state_reason``.
    why_not = "no shard copies are kept (fault_tolerance.shard_copy_interval_steps=0)"
    #: Whether copies are taken between chunks: every chunk's end is then one where every rank is idle.
    between_chunks = False

    def after_chunk(self, members: list[Any], step: int, family: str) -> None:
        """Every member is idle at ``step`` (a chunk ended): refresh the copies if due."""

    def held(self, world_size: int, family: str, newest_checkpoint: int) -> HeldState | None:
        """A complete set the group of ``world_size`` on ``family`` can go on from; None: none fits."""
        return None

    def drop(self, why: str) -> None:
        """Release the set (it could not be used)."""


class KeptShardCopies(ShardCopies):
    between_chunks = True

    def __init__(self, interval_steps: int, journal: Journal) -> None:
        self.interval_steps = interval_steps
        self.journal = journal
        self.current: _CopySet | None = None
        self.why_not = "no shard copy was taken yet"

    def after_chunk(self, members: list[Any], step: int, family: str) -> None:
        copies = self.current
        same_group = copies is not None and (copies.family, len(copies.refs)) == (family, len(members))
        if same_group and copies is not None and 0 <= step - copies.step < self.interval_steps:
            return  # not due (a step before the set's: the group went back to a checkpoint, due)
        started = time.monotonic()
        copying = [m.shard_copy.options(num_returns=2).remote() for m in members]
        try:
            receipts = calls.get([receipt for _, receipt in copying], timeout=_TIMEOUT_S)
        except calls.call_errors() as exc:
            # A rank lost or stuck while copying: the previous set is kept; the next chunk finds the rank.
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("shard copies of step %d not taken: %s", step, why)
            self.journal.record("shard_copies_failed", step=step, error=why[:500])
            return
        steps = {r["step"] for r in receipts}
        if steps != {step} or [r["rank"] for r in receipts] != list(range(len(members))):
            self.journal.record("shard_copies_failed", step=step, error=f"ranks at steps {sorted(steps)}")
            return
        self.current = _CopySet(step, family, tuple(copy for copy, _ in copying))
        self.journal.record(
            "shard_copies",
            step=step,
            ranks=len(members),
            bytes=sum(int(r["bytes"]) for r in receipts),
            copy_s=time.monotonic() - started,
            durable=False,  # one per chunk, like the heartbeats: its loss in a crash costs detail only
        )

    def held(self, world_size: int, family: str, newest_checkpoint: int) -> HeldState | None:
        copies = self.current
        if copies is None:
            return None
        if len(copies.refs) != world_size or copies.family != family:
            self.why_not = (
                f"the shard copies are of {len(copies.refs)} ranks on {copies.family}, the group has "
                f"{world_size} on {family}"
            )
            return None
        if copies.step < newest_checkpoint:
            self.why_not = f"the checkpoint of step {newest_checkpoint} is newer than the shard copies"
            return None
        return HeldState(None, copies.step, f"shard copies at step {copies.step}", refs=copies.refs)

    def drop(self, why: str) -> None:
        self.current, self.why_not = None, why


def shard_copies_for(config: Config, journal: Journal) -> ShardCopies:
    """The shard copies a run keeps: none for replicated state (DDP: a peer's snapshot restores any rank) or
    with ``fault_tolerance.shard_copy_interval_steps=0``."""
    interval = config.fault_tolerance.shard_copy_interval_steps
    if not config.train.sharded or interval == 0:
        return ShardCopies()
    return KeptShardCopies(interval, journal)
