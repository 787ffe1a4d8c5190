"""Where a group that changes — repaired, rebuilt, handed over — takes its training state from.

The newest state of a run is in the memory of its live members; a committed checkpoint is older, the
initial state older still. Before the old members go, :func:`hold_newest` snapshots the most advanced live
member into Ray's object store (the driver owns the object, so it outlives the member and its group); once
the new members are up, :func:`load` gives them that snapshot, else the newest good checkpoint, else
nothing (the initial state). Both say where the state came from and why, for the journal. Sharded state
(FSDP) has no whole snapshot: there the held state is every rank's copy of its own shards
(:mod:`trainer.cluster.shard_copies`), which :func:`load` gives each rank its own of.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from trainer.cluster import calls

log = logging.getLogger(__name__)


#: Seconds a live member may take to snapshot (or evaluate) before the next one is asked.
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class HeldState:
    """A live member's snapshot, held in Ray's object store while the group around it changes."""

    ref: Any
    step: int
    #: Where it came from, e.g. "peer snapshot from rank 2".
    origin: str
    #: The held-out loss of this state on the family it came from (a hand-over's parity reference); NaN
    #: when it was not asked for.
    reference_loss: float = math.nan
    #: Sharded state: rank → the object holding that rank's own copy of its shards (``ref`` is None), see
    #: :mod:`trainer.cluster.shard_copies`; every rank of a group of this size loads its own.
    refs: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Loaded:
    """What :func:`load` put into the members."""

    step: int
    #: "peer snapshot from rank N", "shard copies at step S", "disk checkpoint" or "initial state (no
    #: checkpoint yet)".
    origin: str
    #: Why that source: the newest state a live member held, or why there was none.
    reason: str
    #: The first member's restore reply when the state came from a checkpoint (path, metrics, ...).
    restored: dict[str, Any] | None = None
    #: The ranks that were given the state (the others already held it); None: every rank.
    into: list[int] | None = None


def hold_newest(members: list[Any], steps: dict[int, int | None], evaluate: bool = False) -> HeldState | None:
    """Snapshot the most advanced of the live members (``steps``: rank → step of the run's state it holds,
    None for a spare that holds none); None when no member can.

    A member that dies or stalls while snapshotting is passed over for the next most advanced one.
    ``evaluate`` also measures the snapshot's held-out loss on its family (a hand-over's reference).
    """
    holding = {rank: step for rank, step in steps.items() if step is not None}
    for rank in sorted(holding, key=lambda r: (-holding[r], r)):
        member = members[rank]
        ref = member.snapshot.remote()
        ready, _ = calls.wait([ref], timeout=_TIMEOUT_S, fetch_local=False)
        try:
            if not ready:
                raise TimeoutError(f"no snapshot within {_TIMEOUT_S:.0f} s")
            # A member still answering after its snapshot finished produced it (a dead one raises here).
            check = member.evaluate.remote() if evaluate else member.info.remote()
            answer = calls.get(check, timeout=_TIMEOUT_S)
        except calls.lost_errors(TimeoutError) as exc:  # gone, or too slow to answer
            log.warning("rank %d could not hand over its state: %s", rank, str(exc).splitlines()[0])
            continue
        loss = float(answer) if evaluate else math.nan
        return HeldState(ref, holding[rank], f"peer snapshot from rank {rank}", loss)
    return None


def load(
    members: list[Any],
    held: HeldState | None,
    checkpoint_root: str,
    keep_last: int,
    holding: Collection[int] = (),
) -> Loaded:
    """Give every member the newest state there is: ``held``, else the newest good checkpoint, else none.

    ``holding``: ranks whose members already hold the state of ``held.step`` (survivors of a repair, which
    held it when ``held`` was taken from one of them): they keep their own, as an uninterrupted run would
    (their RNG streams too), and only the others load the snapshot. Ignored when the state is not ``held``.
    Shard copies (``held.refs``) go to every rank, each its own; when they cannot (another world size, a
    copy lost with its node) the checkpoint is loaded instead, and ``Loaded.reason`` says why.
    """
    why = "no live member held the state"
    if held is not None and held.refs:
        loaded = _load_copies(members, held)
        if isinstance(loaded, Loaded):
            return loaded
        why = loaded
    elif held is not None:
        into = [rank for rank in range(len(members)) if rank not in holding]
        calls.get([members[rank].load_snapshot.remote(held.ref, rank) for rank in into])
        return Loaded(held.step, held.origin, f"a live member held step {held.step}", into=into)
    restored = calls.get([m.restore.remote(checkpoint_root, keep_last) for m in members])
    if restored[0] is not None:
        return Loaded(int(restored[0]["step"]), "disk checkpoint", why, restored[0])
    return Loaded(0, "initial state (no checkpoint yet)", f"{why} and no checkpoint exists")


def _load_copies(members: list[Any], held: HeldState) -> Loaded | str:
    """Every rank loads its own shard copy of ``held``; what was loaded, or why the copies could not be."""
    if len(held.refs) != len(members):
        return f"the shard copies are of {len(held.refs)} ranks, the group has {len(members)}"
    into = list(range(len(members)))
    loads = [members[rank].load_snapshot.remote(held.refs[rank], rank) for rank in into]
    try:
        calls.get(loads)
    except _object_lost() as exc:  # a copy gone with its node (members lost raise otherwise)
        log.warning("a shard copy was lost: %s", str(exc).splitlines()[0])
        # The other members' loads end before the checkpoint's restore is asked of them.
        calls.wait(loads, num_returns=len(loads), timeout=_TIMEOUT_S, fetch_local=False)
        return f"a shard copy was lost ({type(exc).__name__}): with its node?"
    reason = f"every rank's copy of its own shards at step {held.step} is held by the driver"
    return Loaded(held.step, held.origin, reason, into=into)


def _object_lost() -> type[BaseException]:
    """Ray's error for an object gone with its node (shard copies are held by Ray: Ray is imported then)."""
    import ray

    return ray.exceptions.ObjectLostError  # type: ignore[no-any-return]
