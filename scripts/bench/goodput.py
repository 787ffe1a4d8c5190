"""Effective training time with one worker loss per minute of training, on a 2-worker local Ray group.

A worker of the group is SIGKILLed from outside every ``--kill-every`` seconds (60 by default) while the
run trains; the controller replaces it from a warm spare with the state of a surviving peer. The goodput
account (``trainer/goodput.py``) gives productive step time ÷ wall time and the badput by bucket; the
figure without start-up (workers spawning, which a long run pays once) is reported beside it.
Goal: ≥ 0.95.

    .venv/bin/python scripts/bench/goodput.py [--minutes 3] [--kill-every 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from trainer.cluster.controller import Controller
from trainer.journal import Journal
from trainer.testing.configs import make_config
from trainer.testing.local_ray import local_ray


def kill_a_worker(ctl: Controller, rank: int) -> dict[str, Any] | None:
    """SIGKILL the process of ``rank``; None when the group is between incarnations."""
    group = ctl.group
    if group is None or len(group.members) <= rank:
        return None
    try:
        info = ray.get(group.members[rank].info.remote(), timeout=5)
    except (ray.exceptions.RayError, TimeoutError):
        return None
    os.kill(int(info["pid"]), signal.SIGKILL)
    return {"time": time.time(), "rank": rank, "pid": info["pid"], "step": ctl.step}


@contextlib.contextmanager
def _removed_after(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _quietly(ctl: Controller) -> None:
    """Run the controller with its progress output on stderr: stdout carries only the JSON result."""
    with contextlib.redirect_stdout(sys.stderr):
        ctl.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training time to aim for")
    parser.add_argument("--kill-every", type=float, default=60.0)
    parser.add_argument("--step-s", type=float, default=0.03, help="expected step time, to size the run")
    args = parser.parse_args()
    steps = int(args.minutes * 60 / args.step_s)
    work = Path(tempfile.mkdtemp(prefix="bench-goodput-"))
    kills: list[dict[str, Any]] = []
    with local_ray(), _removed_after(work):
        config = make_config(
            "cluster=ray_local",
            "device=sim_npu",
            f"train.steps={steps}",
            "train.log_interval=1000000",
            "cluster.chunk_steps=20",
            "checkpoint.interval_steps=1000",
            "probes.preflight=false",
            "monitoring=off",
            "cluster.max_restarts=1000",
            "fault_tolerance.max_failures_per_family=1000",
        )
        journal = Journal(work / "journal.jsonl")
        ctl = Controller(config, work, work / "checkpoints", journal, "127.0.0.1")
        runner = threading.Thread(target=_quietly, args=(ctl,), daemon=True)
        runner.start()
        next_kill = time.monotonic() + args.kill_every
        while runner.is_alive():
            runner.join(timeout=0.5)
            if runner.is_alive() and time.monotonic() >= next_kill:
                killed = kill_a_worker(ctl, rank=len(kills) % config.cluster.workers)
                if killed is not None:
                    kills.append(killed)
                    next_kill = time.monotonic() + args.kill_every
        events = journal.read()
    final = [e for e in events if e["event"] == "goodput"][-1]
    startup = final["badput_s"]["startup"]
    recovered = [e for e in events if e["event"] == "recovered"]
    steady = final["productive_s"] / (final["wall_s"] - startup)
    print(
        json.dumps(
            {
                "benchmark": "goodput",
                "definition": "productive step time / wall time of the run (driver's goodput account); "
                "steady_state excludes the one-off start-up",
                "steps": steps,
                "kill_every_s": args.kill_every,
                "kills": len(kills),
                "recoveries": len(recovered),
                "recover_s": [round(r["recover_s"], 3) for r in recovered],
                "wall_s": final["wall_s"],
                "productive_s": final["productive_s"],
                "badput_s": final["badput_s"],
                "goodput": final["ratio"],
                "goodput_steady_state": steady,
                "goal_min": 0.95,
                "goal_met": final["ratio"] >= 0.95,
                "goal_met_steady_state": steady >= 0.95,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
