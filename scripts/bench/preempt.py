"""Preemption of the driver: SIGTERM → exit time and training steps lost, against a driver without handling.

Each repeat starts ``python -m trainer`` with periodic checkpoints every ``--interval`` steps and signals it
part-way between two of them (at interval x 1.3, 1.5, 1.7, … steps, the same points for both):

* **toolkit**: SIGTERM, as Kubernetes, a spot reclaim or SLURM sends it. The driver stops every rank at
  the step in flight, commits it and exits with code 5. Lost = the newest step completed before the
  signal - the step saved (0 when the step in flight was saved).
* **without handling** — what a user of torchrun or Ray Train gets: the process ends at the signal (the
  default disposition of SIGTERM; sent as SIGKILL here, since this driver installs a handler) and the
  run resumes from its last periodic checkpoint. Lost = the newest completed step - that checkpoint's step.

``--to group`` sends the toolkit's SIGTERM to the driver's whole process group (``kill -TERM -<pgid>``)
instead of the driver alone; with ``--mode ray`` that group also started the local Ray's processes.

Prints one JSON object: per-repeat samples, medians, and ``steps_lost`` of both.

    .venv/bin/python scripts/bench/preempt.py [--mode single|ray] [--interval 100] [--repeats 3]
        [--to driver|group]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer.checkpoint import CheckpointStore

SMALL = (
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=1000000",
    "train.log_interval=1",
    "monitoring=off",
)
RAY = ("cluster=ray_local", "device=sim_npu", "cluster.workers=2", "probes.preflight=false")


def _events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    path = run_dir / "journal.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == name]


def one(
    mode: str, interval: int, at_step: int, handled: bool, work: Path, to: str = "driver"
) -> dict[str, Any]:
    run_dir = work / f"{mode}-{at_step}-{'toolkit' if handled else 'plain'}"
    extra = RAY if mode == "ray" else ("device=cpu",)
    command = [sys.executable, "-m", "trainer", *SMALL, *extra, f"checkpoint.interval_steps={interval}"]
    driver = subprocess.Popen(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert driver.stdout is not None
    seen = 0
    deadline = time.monotonic() + 600
    for line in driver.stdout:
        if line.startswith("step "):
            seen = int(line.split()[1].split("/")[0])
            if seen >= at_step:
                break
        if time.monotonic() > deadline:
            driver.kill()
            raise RuntimeError(f"{mode}: the run never reached step {at_step}")
    signalled = time.monotonic()
    if handled and to == "group":
        os.killpg(driver.pid, signal.SIGTERM)
    elif handled:
        driver.send_signal(signal.SIGTERM)
    else:
        os.killpg(
            driver.pid, signal.SIGKILL
        )  # the driver and, with ray_local, its local Ray with the workers
    driver.communicate(timeout=300)
    exit_s = time.monotonic() - signalled
    if handled:
        [preempted] = _events(run_dir, "preempted")
        saved = preempted.get("saved_step")
    else:
        # What a re-run resumes from: the newest checkpoint committed on disk (a background write of the
        # last periodic one may have committed without having been journalled yet).
        committed = CheckpointStore(run_dir / "checkpoints").committed()
        saved = CheckpointStore(run_dir / "checkpoints").verify(committed[-1]).step if committed else 0
    return {
        "step_at_signal": seen,
        "saved_step": saved,
        "steps_lost": max(0, seen - int(saved or 0)),
        "exit_s": exit_s,
        "exit_code": driver.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="single", choices=["single", "ray"])
    parser.add_argument("--interval", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--to", default="driver", choices=["driver", "group"], help="whom SIGTERM is sent to")
    args = parser.parse_args()
    samples: dict[str, list[dict[str, Any]]] = {"toolkit": [], "without_handling": []}
    with tempfile.TemporaryDirectory(prefix="bench-preempt-") as tmp:
        for i in range(args.repeats):
            at_step = int(args.interval * (1.3 + 0.2 * i))
            samples["toolkit"].append(one(args.mode, args.interval, at_step, True, Path(tmp), args.to))
            samples["without_handling"].append(one(args.mode, args.interval, at_step, False, Path(tmp)))

    def median(side: str, key: str) -> float:
        return statistics.median(float(s[key]) for s in samples[side])

    result = {
        "benchmark": "preempt",
        "mode": args.mode,
        "sigterm_to": args.to,
        "checkpoint_interval_steps": args.interval,
        "repeats": args.repeats,
        "samples": samples,
        "median": {
            side: {"steps_lost": median(side, "steps_lost"), "exit_s": median(side, "exit_s")}
            for side in samples
        },
        "toolkit_exit_codes": sorted({s["exit_code"] for s in samples["toolkit"]}),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
