"""Per-node relays: a chunk's calls to the members of one node batched into one call from the driver.

Without them the driver makes one ``train`` call per member per chunk and handles one reply per member. At
1,000 members that cost ~0.4-0.7 ms of driver CPU per member per chunk, and a profile shows where: Ray's
own per-call work (submitting the task, ~0.2 ms of Python; sending it and taking the reply in, the core
worker's threads) — not the watcher's handling of the replies, so batching the driver's ``ray.get`` does
not help; making fewer calls does. A :class:`Relay` runs in one small actor per node (no CPU reserved),
makes the node's calls and returns their replies together: the driver makes one call per node.

A relayed member's reply, failure or loss reaches the driver at most one poll later than a directly
called one's, and the first failure of a node at once:

- ``train(until, settle_s, ahead, every)`` returns when every member of the node has replied, as soon as one has failed
  (a collective error) or died (its call raised ``RayActorError``: the relay reports it as lost, with
  Ray's ``preempted`` flag), or ``settle_s`` (the watcher's poll) after the first reply; the driver then
  asks ``more(wait_s)`` for the rest, which returns when all are in or after ``wait_s`` with what it has. So a
  reply reaches the driver at most one poll later than a direct one would (ranks in lockstep reply within
  milliseconds of each other: in a healthy chunk, one call per node), and the release window, which ranks
  were still blocked when it ran out, and the ranks that stopped early in a stop request are judged as
  without relays;
- ``progress(ranks)`` answers the hang check and the stop path for the node in one call;
- an exception raised by a member's ``train`` (the user's code) reaches the driver as it would directly.

A relay that dies takes its node's ranks with it (reported lost): relays run on the node they serve, so that
is what a node loss looks like anyway. Nodes hosting fewer than :data:`RELAY_FROM` members are called
directly — a relay there saves too little to pay for the extra hop and process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer.cluster import calls

log = logging.getLogger(__name__)

#: A node's members go through a relay when it hosts at least this many of them.
RELAY_FROM = 4


class Relay:
    """The node's side: its members by rank, and their ``train`` calls in flight."""

    def __init__(self) -> None:
        self.members: dict[int, Any] = {}
        self.inflight: dict[int, asyncio.Future[Any]] = {}

    def assign(self, members: dict[int, Any]) -> None:
        """The node's members from now on (called when the group changed, between chunks)."""
        self.members = dict(members)
        self.inflight = {}

    async def train(
        self, until: int, settle_s: float, ahead: int | None = None, every: int = 0
    ) -> dict[int, dict[str, Any]]:
        """Every member trains until step ``until`` (and on towards ``ahead``: ``WorkerActor.train``); the
        replies once all are in, as soon as one member failed, or ``settle_s`` after the first reply (a
        member stopped early, the others not yet: the driver must see it as it would without a relay)."""
        self.inflight = {
            rank: asyncio.wrap_future(member.train.remote(*train_args(until, ahead, every)).future())
            for rank, member in self.members.items()
        }
        return await self._gather(settle_s, from_first=True)

    async def more(self, wait_s: float) -> dict[int, dict[str, Any]]:
        """Replies still due from the last ``train``: when all are in, or after ``wait_s`` with those that
        came (possibly none). Once one has failed, the release window runs: the others are only needed
        before it ends, so they come in one batch rather than one call per failure."""
        return await self._gather(wait_s, from_first=False)

    async def progress(self, ranks: list[int], timeout_s: float) -> dict[int, dict[str, Any]]:
        """Each of ``ranks``' progress mark; ranks that do not answer within ``timeout_s`` are left out."""
        asked = {
            rank: asyncio.wrap_future(self.members[rank].progress.remote().future())
            for rank in ranks
            if rank in self.members
        }
        if asked:
            await asyncio.wait(asked.values(), timeout=timeout_s)
        return {
            rank: future.result()
            for rank, future in asked.items()
            if future.done() and future.exception() is None
        }

    async def _gather(self, wait_s: float, from_first: bool) -> dict[int, dict[str, Any]]:
        """Replies as they come, until all are in or ``wait_s`` has passed: counted from the first reply
        when ``from_first`` (``train``), which also returns as soon as one failed; else from now."""
        loop = asyncio.get_running_loop()
        give_up_at = None if from_first else loop.time() + wait_s
        replies: dict[int, dict[str, Any]] = {}
        while self.inflight:
            timeout = None if give_up_at is None else max(0.0, give_up_at - loop.time())
            done, _ = await asyncio.wait(
                self.inflight.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for rank in [r for r, future in self.inflight.items() if future.done()]:
                replies[rank] = _reply(self.inflight.pop(rank))
            if from_first and any(not reply["ok"] for reply in replies.values()):
                break  # the driver hears of a failure as soon as it would without a relay
            if give_up_at is None:
                give_up_at = loop.time() + wait_s
        return replies


def train_args(until: int, ahead: int | None, every: int) -> tuple[int, ...]:
    """A member's ``train`` arguments: ``ahead`` and ``every`` only when the chunk is not the stretch's end."""
    return (until,) if ahead is None or ahead <= until else (until, ahead, every)


def _reply(future: asyncio.Future[Any]) -> dict[str, Any]:
    """A finished ``train`` call: its reply, or a dead member as ``lost``. Any other error (the user's code
    raised) is raised again, and reaches the driver through the relay's own call."""
    import ray  # in the relay's own process, a Ray actor's

    try:
        return dict(future.result())
    except ray.exceptions.RayActorError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {
            "ok": False,
            "lost": True,
            "error": first,
            "preempted": bool(getattr(exc, "preempted", False)),
        }
    except ray.exceptions.RayTaskError as exc:  # raised inside the member: the driver gets that error itself
        raise exc.cause from None


@functools.cache
def _relay_actor() -> Any:
    """The relay as a Ray actor: asyncio, so that its calls wait side by side; it reserves no CPU."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(Relay)


def start_relay(node_id: str) -> Any:
    """A relay actor on node ``node_id`` (hard affinity: it serves the members of that node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    return _relay_actor().options(scheduling_strategy=strategy).remote()


@dataclass
class Routes:
    """How one chunk reaches the members: through which relay each node's ranks go, and who is called
    directly."""

    relayed: list[tuple[Any, list[int]]] = field(default_factory=list)
    direct: list[int] = field(default_factory=list)

    def batches(self, ranks: list[int]) -> tuple[list[tuple[Any, list[int]]], list[int]]:
        """``ranks`` split the same way: (relay, its ranks among them) and the ranks called directly."""
        wanted = set(ranks)
        relayed = [(relay, [r for r in rs if r in wanted]) for relay, rs in self.relayed]
        return [(relay, rs) for relay, rs in relayed if rs], [r for r in self.direct if r in wanted]


class Relays:
    """The driver's side: each member's node (asked once per actor), one relay per node, started on first
    use and told its members whenever they change."""

    def __init__(self, start: Callable[[str], Any] = start_relay, relay_from: int = RELAY_FROM) -> None:
        """``start``: makes the relay of a node (given its id); ``relay_from``: the fewest members of one
        node that are relayed."""
        self.start = start
        self.relay_from = relay_from
        self.node_of: dict[Any, str | None] = {}
        self.relays: dict[str, Any] = {}
        self.assigned: dict[str, dict[int, Any]] = {}

    def routes(self, members: list[Any]) -> Routes:
        """The routes of a chunk over ``members`` (rank = index)."""
        self._learn_nodes(members)
        by_node: dict[str | None, list[int]] = {}
        for rank, member in enumerate(members):
            by_node.setdefault(self.node_of.get(member), []).append(rank)
        routes = Routes()
        for node, ranks in by_node.items():
            relay = None
            if node is not None and len(ranks) >= self.relay_from:
                relay = self._relay(node, {rank: members[rank] for rank in ranks})
            if relay is None:
                routes.direct.extend(ranks)
            else:
                routes.relayed.append((relay, ranks))
        routes.direct.sort()
        return routes

    def forget(self, relay: Any) -> None:
        """A relay found dead: the next chunk starts another on its node."""
        for node, known in list(self.relays.items()):
            if known is relay:
                del self.relays[node]
                self.assigned.pop(node, None)

    def shutdown(self) -> None:
        for relay in self.relays.values():
            try:
                calls.kill(relay)
            except Exception as exc:  # already gone
                log.debug("kill failed: %s", exc)
        self.relays.clear()
        self.assigned.clear()

    def _learn_nodes(self, members: list[Any]) -> None:
        """Ask members never seen before which node they run on (``info()["node"]``); forget the others."""
        new = [m for m in members if m not in self.node_of]
        refs = [m.info.remote() for m in new]
        for member, ref in zip(new, refs, strict=True):
            try:
                self.node_of[member] = calls.get(ref, timeout=30.0).get("node")
            except calls.call_errors():
                self.node_of[member] = None  # called directly; a dead one is found by its train() call
        self.node_of = {m: self.node_of[m] for m in members}

    def _relay(self, node: str, members: dict[int, Any]) -> Any | None:
        """The relay of ``node``, told ``members`` if they changed; None if it cannot be had."""
        try:
            relay = self.relays.get(node)
            if relay is None:
                relay = self.relays[node] = self.start(node)
            if self.assigned.get(node) != members:
                calls.get(relay.assign.remote(members), timeout=60.0)
                self.assigned[node] = dict(members)
            return relay
        except calls.call_errors() as exc:
            log.warning("no relay on node %s, its members are called directly: %s", node, exc)
            self.relays.pop(node, None)
            self.assigned.pop(node, None)
            return None


def progress_of(
    members: list[Any], ranks: list[int], routes: Routes, timeout_s: float = 5.0
) -> dict[int, Any]:
    """Rank → progress mark for ``ranks`` (one call per relay, one per directly called rank); ranks that do
    not answer in time are left out (dead ones surface through their ``train`` reply)."""
    relayed, direct = routes.batches(ranks)
    asked: dict[Any, list[int] | int] = {relay.progress.remote(rs, timeout_s): rs for relay, rs in relayed}
    asked.update({members[rank].progress.remote(): rank for rank in direct})
    found: dict[int, Any] = {}
    for ref, who in asked.items():
        try:
            value = calls.get(ref, timeout=timeout_s * 2)
        except calls.call_errors():
            continue
        found.update(value if isinstance(who, list) else {who: value})
    return found
