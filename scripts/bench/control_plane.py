"""The controller's own cost against the number of members: 10, 100 and 1,000, on one local Ray.

What is measured is the driver's side of a group run, with the real code: the chunk watcher
(``trainer.cluster.watch.run_chunk``: the ``train`` calls, waits, collection of the replies), the
heartbeat built from the replies (``trainer.heartbeat.Heartbeat``), the straggler bookkeeping
(``trainer.cluster.health_watch.HealthWatch``) and the policy's decision (``trainer.policy.decide``).

The members are simulated, because an idle Ray actor takes about 57 MiB and 1,000 do not fit here: one
asyncio actor (``MemberPool``) hosts all of them, and each member is a handle whose ``train.remote(...)``,
``progress.remote()`` and ``stop_after.remote(...)`` are calls of the pool for that member — real Ray
calls and object references, one per member and call, as with real workers. A simulated step takes
``--step-ms`` (an ``asyncio.sleep``); its reply carries the figures a worker's does. A member killed by the
benchmark makes its ``train`` call fail with Ray's ``ActorDiedError`` (what a dead worker's call raises), and
its peers' calls return a collective error at once (the release cascade of a real gloo group).

Each N is measured both ways, interleaved (A B A B): every member called directly, as on a node that
hosts few, and each simulated node's members (``--per-node``, 8) through its relay
(``trainer.cluster.relay.Relay``, the real code; the relays of all simulated nodes live in one actor,
``RelayHost``, whose calls to the members are real Ray calls). Per N and route it reports, medians over
``--repeats`` chunks:

* ``driver_calls_per_chunk``: the Ray calls the driver makes for one chunk;
* ``controller_cpu_ms_per_chunk``: the driver process's CPU time for one healthy chunk (watch + heartbeat +
  straggler check), and ``..._per_member_us``;
* ``wall_overhead_ms``: the chunk's wall time beyond the simulated steps;
* ``detect_s``: from the kill of one member to the watcher's return naming it lost (every survivor
  released);
* ``decide_ms``: the policy's decision for that loss.

Ray's own detection of a dead process is not part of this (``scripts/bench/ray_detection.py`` measures it
with real actors). Run from the repository root::

    .venv/bin/python scripts/bench/control_plane.py [--members 10 100 1000] [--repeats 5] [--steps 5]

It prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from trainer.cluster.health_watch import HealthWatch
from trainer.cluster.relay import Relay, Relays
from trainer.cluster.watch import run_chunk
from trainer.goodput import Goodput
from trainer.heartbeat import Heartbeat
from trainer.journal import Journal
from trainer.metrics import NullSink
from trainer.policy import FailureEvent, FailureKind, PolicyConfig, decide
from trainer.testing.configs import make_config

#: Goals of the issue: detection under 2 s and a decision under 100 ms at 1,000 members.
GOAL_DETECT_S = 2.0
GOAL_DECIDE_MS = 100.0


@ray.remote(num_cpus=0)
class MemberPool:
    """Simulated members: their step, progress mark and stop request; ``train`` sleeps per step."""

    def __init__(self, size: int, step_s: float, per_node: int) -> None:
        self.step_s = step_s
        self.per_node = per_node
        self.steps = [0] * size
        self.stop: list[int | None] = [None] * size
        self.phase = ["idle"] * size
        self.dead: set[int] = set()
        self.failed = asyncio.Event()

    async def train(self, member: int, until: int) -> dict[str, Any]:
        if member in self.dead:
            raise ray.exceptions.ActorDiedError()
        losses, times = [], []
        start = time.perf_counter()
        while self.steps[member] < min(until, self._stop_of(member)):
            self.phase[member] = "collective"
            with contextlib.suppress(TimeoutError):  # the step's time, cut short when a peer fails
                await asyncio.wait_for(self.failed.wait(), timeout=self.step_s)
            if member in self.dead:
                raise ray.exceptions.ActorDiedError()
            if self.failed.is_set():  # a peer is gone: this member's collective fails (released)
                self.phase[member] = "idle"
                return {"ok": False, "step": self.steps[member], "error": "Connection closed by peer"}
            self.steps[member] += 1
            losses.append(1.0 / self.steps[member])
            times.append(self.step_s)
        self.phase[member] = "idle"
        return {
            "ok": True,
            "step": self.steps[member],
            "losses": losses,
            "step_times": times,
            "compute_times": [self.step_s / 2] * len(times),
            "elapsed_s": time.perf_counter() - start,
            "skipped_steps": [],
            "task_metrics": {},
        }

    def _stop_of(self, member: int) -> int:
        stop = self.stop[member]
        return sys.maxsize if stop is None else stop

    def info(self, member: int) -> dict[str, Any]:
        return {"node": f"node-{member // self.per_node}"}

    def progress(self, member: int) -> dict[str, Any]:
        return {"step": self.steps[member], "phase": self.phase[member], "since": time.time()}

    def stop_after(self, member: int, step: int) -> int:
        self.stop[member] = step
        return self.steps[member]

    def release(self, member: int) -> int:
        """Asked of the members still training once one failed: no group's connections to shut down here."""
        return 0

    def kill(self, member: int) -> None:
        self.dead.add(member)
        self.failed.set()

    def reset(self) -> None:
        self.steps = [0] * len(self.steps)
        self.stop = [None for _ in self.steps]
        self.dead.clear()
        self.failed = asyncio.Event()


class _Call:
    def __init__(self, actor: Any, method: str, *first: Any) -> None:
        self.actor, self.method, self.first = actor, method, first

    def remote(self, *args: Any) -> Any:
        return getattr(self.actor, self.method).remote(*self.first, *args)


class Member:
    """What the controller calls on a worker, routed to the pool."""

    def __init__(self, pool: Any, index: int) -> None:
        self.train = _Call(pool, "train", index)
        self.progress = _Call(pool, "progress", index)
        self.stop_after = _Call(pool, "stop_after", index)
        self.info = _Call(pool, "info", index)
        self.release = _Call(pool, "release", index)


@ray.remote(num_cpus=0)
class RelayHost:
    """The simulated nodes' relays: one :class:`~trainer.cluster.relay.Relay` per node, all in this actor
    (one actor per node would not fit either). Their calls to the members are real Ray calls."""

    def __init__(self) -> None:
        self.relays: dict[str, Relay] = {}

    async def call(self, node: str, method: str, *args: Any) -> Any:
        result = getattr(self.relays.setdefault(node, Relay()), method)(*args)
        return await result if asyncio.iscoroutine(result) else result


class RelayOf:
    """What the driver calls on one node's relay, routed to the host."""

    def __init__(self, host: Any, node: str) -> None:
        for method in ("assign", "train", "more", "progress"):
            setattr(self, method, _Call(host, "call", node, method))


def measure(
    size: int, repeats: int, steps: int, step_s: float, per_node: int, journal: Journal
) -> list[dict[str, Any]]:
    """One row per route (members called directly, then through their nodes' relays), measured A B A B."""
    pool = MemberPool.options(max_concurrency=size + 64).remote(size, step_s, per_node)  # type: ignore[attr-defined]
    host = RelayHost.remote()  # type: ignore[attr-defined]
    members = [Member(pool, i) for i in range(size)]
    routes = {"direct": None, "relayed": Relays(start=lambda node: RelayOf(host, node))}
    config = make_config("cluster=ray_local", f"cluster.workers={size}", "train.global_batch_size=1000000")
    health = HealthWatch(config, journal, NullSink(), Goodput())
    cpu: dict[str, list[float]] = {name: [] for name in routes}
    overhead: dict[str, list[float]] = {name: [] for name in routes}
    until = 0
    for _ in range(repeats + 1):  # the first chunk of each warms up (Ray's workers, the relays, the tasks)
        for name, relays in routes.items():
            until += steps
            wall, used = time.perf_counter(), time.process_time()
            outcome = run_chunk(members, until, 60.0, 120.0, 10.0, relays=relays)
            beat = Heartbeat.of(outcome.results, until)
            health.after_chunk(members, "sim_npu", until, outcome)  # type: ignore[arg-type]
            used, wall = time.process_time() - used, time.perf_counter() - wall
            assert not outcome.failed() and beat.step == until and len(outcome.results) == size, outcome
            cpu[name].append(used)
            overhead[name].append(wall - steps * step_s)

    detect: dict[str, list[float]] = {name: [] for name in routes}
    decide_ms: dict[str, list[float]] = {name: [] for name in routes}
    policy = PolicyConfig.of(config, set())
    for _ in range(repeats):
        for name, relays in routes.items():
            ray.get(pool.reset.remote())
            victim = size // 2
            killed_at: list[float] = []

            def kill(victim: int = victim, killed_at: list[float] = killed_at) -> None:
                time.sleep(steps * step_s / 2)
                killed_at.append(time.perf_counter())
                ray.get(pool.kill.remote(victim))

            killer = threading.Thread(target=kill)
            killer.start()
            outcome = run_chunk(members, steps * 1000, 60.0, 120.0, 10.0, relays=relays)
            returned = time.perf_counter()
            killer.join()
            assert outcome.lost == [victim] and len(outcome.results) == size - 1, outcome.lost
            detect[name].append(returned - killed_at[0])
            kind, ranks, detail = outcome.event()
            started = time.perf_counter()
            decision = decide([FailureEvent(kind, ranks, 0, "sim_npu", time.time(), detail[:1000])], policy)
            decide_ms[name].append((time.perf_counter() - started) * 1000)
            assert kind is FailureKind.WORKER_LOST and decision.ranks == (victim,), decision
    ray.kill(host)
    ray.kill(pool)
    plan = routes["relayed"].routes(members)  # type: ignore[union-attr]
    calls = {"direct": size, "relayed": len(plan.relayed) + len(plan.direct)}
    rows = []
    for name in routes:
        chunk_cpu = statistics.median(cpu[name][1:])
        rows.append(
            {
                "members": size,
                "route": name,
                "driver_calls_per_chunk": calls[name],
                "controller_cpu_ms_per_chunk": round(chunk_cpu * 1000, 2),
                "controller_cpu_per_member_us": round(chunk_cpu / size * 1e6, 1),
                "wall_overhead_ms": round(statistics.median(overhead[name][1:]) * 1000, 1),
                "detect_s": round(statistics.median(detect[name]), 3),
                "detect_s_max": round(max(detect[name]), 3),
                "decide_ms": round(statistics.median(decide_ms[name]), 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per chunk")
    parser.add_argument("--step-ms", type=float, default=100.0, help="simulated step time")
    parser.add_argument("--per-node", type=int, default=8, help="members per simulated node (relayed route)")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            journal = Journal(Path(tmp) / "journal.jsonl")
            rows = [
                row
                for n in args.members
                for row in measure(n, args.repeats, args.steps, args.step_ms / 1000, args.per_node, journal)
            ]
    finally:
        ray.shutdown()
    largest = max(rows, key=lambda row: (row["members"], row["route"] == "relayed"))
    print(
        json.dumps(
            {
                "benchmark": "control_plane",
                "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "steps_per_chunk": args.steps,
                "members_per_node": args.per_node,
                "step_ms": args.step_ms,
                "rows": rows,
                "goals": {"detect_s": GOAL_DETECT_S, "decide_ms": GOAL_DECIDE_MS},
                "detect_goal_met": largest["detect_s_max"] < GOAL_DETECT_S,
                "decide_goal_met": largest["decide_ms"] < GOAL_DECIDE_MS,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
