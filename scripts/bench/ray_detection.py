"""How fast Ray itself tells the driver that an actor process died, with 8, 16 and 32 real actors.

The control-plane benchmark (``control_plane.py``) simulates its members inside one actor, so a death there
is announced at once; this one measures the part it leaves out. N real actors (a tiny process each: an idle
actor costs about 57 MiB, so 32 fit here) each run a pending call, as workers run a chunk's ``train``;
one is SIGKILLed, and the time is taken from the kill to the moment the driver's ``ray.wait`` over all the
pending calls returns the victim's, which then raises ``ActorDiedError``. The other calls are cancelled and the
victim replaced by a fresh actor between repeats (not timed). Medians over ``--repeats``.

Run from the repository root::

    .venv/bin/python scripts/bench/ray_detection.py [--actors 8 16 32] [--repeats 5]

It prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import time
from typing import Any

import ray


@ray.remote(num_cpus=0)
class Idle:
    """A member that does nothing but hold a call open, like a worker inside its chunk."""

    def pid(self) -> int:
        return os.getpid()

    async def wait(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # asyncio, so that the call can be cancelled after the measurement


def _start(count: int) -> list[Any]:
    actors = [Idle.remote() for _ in range(count)]  # type: ignore[attr-defined]
    ray.get([a.pid.remote() for a in actors], timeout=600)
    return actors


def measure(count: int, repeats: int) -> dict[str, Any]:
    started = time.perf_counter()
    actors = _start(count)
    start_s = time.perf_counter() - started
    detect = []
    for repeat in range(repeats):
        victim = (repeat * 7 + count // 2) % count
        pids = ray.get([a.pid.remote() for a in actors], timeout=60)
        calls = [a.wait.remote(600.0) for a in actors]
        time.sleep(0.5)  # every call is running
        killed_at = time.perf_counter()
        os.kill(pids[victim], signal.SIGKILL)
        done, _ = ray.wait(calls, num_returns=1, timeout=120)
        seen_at = time.perf_counter()
        assert done == [calls[victim]], "the victim's call did not end first"
        try:
            ray.get(done[0])
            raise AssertionError("the victim's call returned")
        except ray.exceptions.ActorDiedError:
            pass
        detect.append(seen_at - killed_at)
        for call in calls:
            if call is not calls[victim]:
                ray.cancel(call)
        actors[victim] = _start(1)[0]
    for actor in actors:
        ray.kill(actor, no_restart=True)
    return {
        "actors": count,
        "start_s": round(start_s, 1),
        "detect_s": round(statistics.median(detect), 3),
        "detect_s_max": round(max(detect), 3),
        "detect_s_all": [round(d, 3) for d in detect],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = [measure(n, args.repeats) for n in args.actors]
    finally:
        ray.shutdown()
    print(
        json.dumps(
            {
                "benchmark": "ray_detection",
                "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "ray": ray.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
