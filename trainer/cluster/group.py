"""A gang of worker actors in a placement group, plus warm spares, and the rendezvous that joins them.

Each bundle asks for one unit of the family's Ray resource and a fraction of a CPU. A lost worker's
bundle is refilled with a new spare while the old spare takes the lost rank, so the group's shape never
changes unless the policy decides so. The group starts with its spares up; an actor started later (a
refill) becomes a spare when it first answers, and is handed to ``on_spare_ready`` then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
import torch.distributed as dist
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainer.cluster import calls
from trainer.cluster.actor import WorkerActor
from trainer.config import Config, to_container
from trainer.devices import DeviceAdapter
from trainer.devices.sim import SimulatedAdapter
from trainer.errors import DeviceUnavailableError

log = logging.getLogger(__name__)


def bundle_for(adapter: DeviceAdapter, cpus: float) -> dict[str, float]:
    resource = adapter.ray_resource()
    if resource == "CPU":
        return {"CPU": cpus}
    return {"CPU": cpus, resource: 1.0}


def capacity(adapter: DeviceAdapter, cpus_per_worker: float) -> int:
    """How many worker bundles of this family the Ray cluster could hold at most (ignoring current use)."""
    resources = ray.cluster_resources()
    bundle = bundle_for(adapter, cpus_per_worker)
    return int(min(resources.get(key, 0.0) // amount for key, amount in bundle.items()))


def free_bundles(adapter: DeviceAdapter, cpus_per_worker: float) -> int:
    """How many more worker bundles of this family the Ray cluster could place now (its free resources)."""
    resources = ray.available_resources()
    bundle = bundle_for(adapter, cpus_per_worker)
    return int(min(resources.get(key, 0.0) // amount for key, amount in bundle.items()))


def _wanted(resources: dict[str, float], bundle: dict[str, float]) -> dict[str, float]:
    return {key: resources.get(key, 0.0) for key in bundle}


class WorkerGroup:
    def __init__(
        self,
        config: Config,
        adapter: DeviceAdapter,
        driver_host: str,
        workers: int | None = None,
        arm_faults: bool = True,
        arm_call_faults: bool = False,
    ) -> None:
        """``arm_faults``: injected kill/hang faults may fire in the first incarnation (the run's first group);
        ``arm_call_faults``: the family's ``die_in_call`` fault is given to its slot (the family's first group)."""
        # The group's own view of the config: its family and world size may differ from the run's start.
        size = workers or config.cluster.workers_on(adapter.name)
        self.config = replace(
            config,
            device=replace(config.device, family=adapter.name),
            # Its world size is ``size``: the run's per-family sizes and elastic floor are the driver's to use.
            cluster=replace(config.cluster, workers=size, family_workers={}, min_workers=None),
        )
        self.adapter = adapter
        self.driver_host = driver_host
        self.size = size
        self.arm_faults = arm_faults
        self.members: list[Any] = []
        self.spares: list[Any] = []
        self._bundle_of: dict[Any, int] = {}
        #: Spares still starting, each with its first ``info()`` call (answered once it is up).
        self._pending_spares: dict[Any, Any] = {}
        self.pg: PlacementGroup | None = None
        self.store: dist.TCPStore | None = None
        self.incarnation = -1
        self.arm_call_faults = arm_call_faults
        #: Actors started so far (the next one's slot number).
        self._spawned = 0
        #: Why fewer warm spares than ``cluster.spares`` were started (None: all of them).
        self.spares_short: str | None = None
        #: Where each actor started runs (pid, host): members first, then spares.
        self.started_on: list[dict[str, Any]] = []
        #: Called with each actor started after the group (a refill) and its ``info()`` when it first answers
        #: (the driver checks and journals it).
        self.on_spare_ready: Callable[[Any, dict[str, Any]], None] | None = None

    # --- life cycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Reserve the bundles and start workers and spares; raises if Ray cannot grant them in time."""
        cluster = self.config.cluster
        # Spares are best effort: as many as fit beside the workers.
        most = capacity(self.adapter, cluster.cpus_per_worker)
        spares = max(0, min(cluster.spares, most - self.size))
        total = self.size + spares
        bundle = bundle_for(self.adapter, cluster.cpus_per_worker)
        if spares < cluster.spares:
            self.spares_short = (
                f"cluster.spares={cluster.spares} but {spares} fit beside {self.size} workers of family "
                f"{self.adapter.name!r}: each takes a bundle of {bundle} and the cluster's resources "
                f"{_wanted(ray.cluster_resources(), bundle)} hold {most}; a lost worker waits for a cold start"
            )
        if self.config.faults.for_family(self.adapter.name).unavailable:
            raise DeviceUnavailableError(f"family {self.adapter.name!r} made unavailable by faults.families")
        missing = [k for k in bundle if ray.cluster_resources().get(k, 0) <= 0]
        if missing:
            raise DeviceUnavailableError(
                f"the Ray cluster has no {missing} resource for family {self.adapter.name!r}; "
                f"resources: {sorted(ray.cluster_resources())}"
            )
        self.pg = placement_group([dict(bundle) for _ in range(total)], strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=cluster.start_timeout_s)
        if not ready:
            available = ray.available_resources()
            remove_placement_group(self.pg)
            self.pg = None
            raise DeviceUnavailableError(
                f"Ray did not grant {total} bundles of {bundle} for family {self.adapter.name!r} within "
                f"cluster.start_timeout_s={cluster.start_timeout_s}s (cluster.workers={self.size}, "
                f"cluster.spares={cluster.spares}); available now: {available}"
            )
        actors = [self._spawn(i) for i in range(total)]
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=cluster.start_timeout_s)
        except calls.call_errors() as exc:
            self.shutdown()
            raise DeviceUnavailableError(
                f"workers of family {self.adapter.name!r} failed to start: {exc}"
            ) from exc
        log.info("worker actors up: %s", infos)
        self.members, self.spares = actors[: self.size], actors[self.size :]
        self.started_on = [{"pid": i["pid"], "host": i["host"], "nice": i["nice"]} for i in infos]
        niced = sorted({i["nice"] for i in infos if i["nice"] > 0})
        if niced:
            log.warning(
                "worker processes run at nice %s: on a host whose cores the ranks fill, Ray's daemons and the "
                "driver take a core from a rank in the middle of its step (a local Ray: "
                "cluster.local_worker_niceness; a cluster: start it with RAY_worker_niceness=0)",
                "/".join(map(str, niced)),
            )

    def _spawn(self, bundle_index: int) -> Any:
        """Start an actor in bundle ``bundle_index``. Actors are numbered in the order they are started (the
        slots of ``faults.families.<family>.die_in_call_slot``): ranks, warm spares, then refills."""
        assert self.pg is not None
        faults = self.config.faults.for_family(self.adapter.name)
        doomed = self.arm_call_faults and faults.die_in_call and self._spawned == faults.die_in_call_slot
        die_in = faults.die_in_call if doomed else None
        self._spawned += 1
        resource = self.adapter.ray_resource()
        # A simulated family's device is its bundle: it stays bad for whichever worker is placed on it.
        simulated_device = bundle_index if isinstance(self.adapter, SimulatedAdapter) else None
        options: dict[str, Any] = {
            "num_cpus": self.config.cluster.cpus_per_worker,
            "max_restarts": 0,
            # Threaded, so that progress() is answered while train() runs.
            "max_concurrency": 4,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=bundle_index
            ),
        }
        if resource == "GPU":
            options["num_gpus"] = 1
        elif resource != "CPU":
            options["resources"] = {resource: 1.0}
        actor = (
            ray.remote(WorkerActor)
            .options(**options)
            .remote(to_container(self.config), self.size, die_in, simulated_device)
        )
        self._bundle_of[actor] = bundle_index
        return actor

    def form(self, timeout_s: float) -> list[int]:
        """Start a new incarnation: fresh rendezvous store, every member joins; returns their steps."""
        self.incarnation += 1
        self.store = dist.TCPStore(
            self.driver_host, 0, self.size + 1, is_master=True, wait_for_workers=False, use_libuv=True
        )
        port = self.store.port
        arm = self.arm_faults and self.incarnation == 0
        refs = [
            m.join.remote(rank, self.size, self.driver_host, port, timeout_s, arm)
            for rank, m in enumerate(self.members)
        ]
        try:
            return ray.get(refs, timeout=timeout_s + 30)  # raises as soon as one member is lost
        except calls.call_errors():
            self.store = None  # closing the rendezvous releases the members still waiting in it
            raise

    def live_steps(self, timeout_s: float = 10.0) -> dict[int, int | None]:
        """Rank → step of the run's state held by each member that answers within ``timeout_s`` (None: it
        holds none yet); the members missing are lost."""
        refs = {m.info.remote(): rank for rank, m in enumerate(self.members)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        steps: dict[int, int | None] = {}
        for ref in ready:
            try:
                steps[refs[ref]] = ray.get(ref)["step"]
            except calls.call_errors():
                continue
        return steps

    def replace(self, ranks: tuple[int, ...]) -> None:
        """Swap the workers of ``ranks`` for spares: warm ones first, then the new actors started in the lost
        workers' bundles (cold, all at once). Every bundle of a lost worker gets a new actor."""
        self._collect_spares()
        for rank in ranks:
            lost = self.members[rank]
            bundle = self._bundle_of.pop(lost)
            calls.kill(lost)
            # The killed actor's bundle frees asynchronously; its new occupant simply queues until it does.
            self._start_spare(bundle)
        for rank in ranks:
            if not self.spares:
                self._collect_spares(wait=True)
            if not self.spares:
                raise DeviceUnavailableError(
                    f"no spare worker to replace rank {rank}: none started within cluster.start_timeout_s="
                    f"{self.config.cluster.start_timeout_s}s (cluster.spares={self.config.cluster.spares})"
                )
            self.members[rank] = self.spares.pop(0)

    def _start_spare(self, bundle_index: int) -> None:
        actor = self._spawn(bundle_index)
        self._pending_spares[actor] = actor.info.remote()

    def _collect_spares(self, wait: bool = False) -> None:
        """Spares that have come up become warm spares, oldest first; ``wait``: until one has (up to the
        start timeout; one that dies while starting is replaced, and the wait goes on)."""
        give_up_at = time.monotonic() + (self.config.cluster.start_timeout_s if wait else 0)
        while self._pending_spares:
            refs = {ref: actor for actor, ref in self._pending_spares.items()}
            timeout = max(0.0, give_up_at - time.monotonic())
            ready, _ = ray.wait(list(refs), num_returns=1 if wait else len(refs), timeout=timeout)
            for ref in [r for r in refs if r in ready]:  # in the order they were started
                actor = refs[ref]
                del self._pending_spares[actor]
                try:
                    info = ray.get(ref)
                except calls.call_errors() as exc:  # it died while starting: its bundle gets another
                    log.warning("a spare died while starting: %s", str(exc).splitlines()[0])
                    self._start_spare(self._bundle_of.pop(actor))
                    continue
                self.spares.append(actor)
                if self.on_spare_ready is not None:
                    self.on_spare_ready(actor, info)
            if not wait or self.spares or not ready:
                return

    def refill_spares(self, timeout_s: float = 1.0) -> int:
        """Replace warm spares that died since they started: each one's bundle gets a new actor, started in the
        background (it becomes a spare once it answers). Returns how many were found dead. A spare that does
        not answer within ``timeout_s`` (busy starting) is left alone."""
        dead = []
        if self.spares:
            refs = {s.info.remote(): s for s in self.spares}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
            for ref in ready:
                try:
                    ray.get(ref)
                except calls.call_errors() as exc:
                    log.warning("a warm spare died: %s", str(exc).splitlines()[0])
                    dead.append(refs[ref])
        for actor in dead:
            self.spares.remove(actor)
            self._start_spare(self._bundle_of.pop(actor))
        self._collect_spares()
        return len(dead)

    def kill(self, ranks: list[int]) -> None:
        """Kill the workers of ``ranks`` now (hung ones); their peers' collectives then fail fast."""
        for rank in ranks:
            calls.kill(self.members[rank])

    def leave_all(self, actors: list[Any]) -> None:
        """Ask live workers to drop their process group; ignore ones that are gone."""
        refs = [a.leave.remote() for a in actors]
        deadline = time.monotonic() + 30
        for ref in refs:
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except calls.call_errors() as exc:
                log.warning("a worker could not leave its group cleanly: %s", exc)

    def shutdown(self) -> None:
        for actor in [*self.members, *self.spares, *self._pending_spares]:
            try:
                calls.kill(actor)
            except Exception as exc:  # already gone
                log.debug("kill failed: %s", exc)
        self.members, self.spares, self._pending_spares = [], [], {}
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self.store = None
