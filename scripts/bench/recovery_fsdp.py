"""The FSDP mode of ``recovery.py``: MTTR of a lost rank of a sharded group, going on from every rank's copy
of its own shards (``fault_tolerance.shard_copy_interval_steps=1``, the default) against restoring the group
from the newest checkpoint on disk (``=0``, the way before shard copies), in one run, interleaved.

The job is ``recovery.py``'s (``trainer.job.run`` on one local Ray of 2 CPUs, ``cluster=ray_local
device=sim_npu cluster.chunk_steps=1``, rank 1 SIGKILLing itself just before step K, the kill time
logged inside the victim by the same ``sitecustomize`` probe) with ``train.parallelism=fsdp``, N ranks
(default 4), a checkpoint every ``--checkpoint-every`` steps, the model's width and depth set here and
one warm spare (the lost rank's replacement; the survivors are released from their collective and keep
their processes — before the ranks still training shut their connections down on a peer's failure, a
survivor that did not neighbour the lost rank was killed and replaced too, and the benchmark needed two).
Per run:

- ``mttr_s``: the SIGKILL to the next completed step (the journal's ``first_step_after_recovery``), as in
  ``recovery.py``. From the copies that step is K (the copies are of step K-1, the chunk end before); from
  the disk it is the step after the newest checkpoint, and the steps since are trained again;
- ``back_to_step_s``: the SIGKILL to the completion of step K, the step in flight at the kill (the first
  heartbeat at or past K): what the run lost in all, the steps trained again included;
- ``state_from``, ``resumed_at_step``, and (copies) ``copy_s``: the median time a refresh of the copies
  held the group at a chunk end, ``copy_bytes``: the bytes of one set (every rank's copy).

Run from the repository root::

    .venv/bin/python scripts/bench/recovery_fsdp.py [--workers 4] [--repeats 3] [--steps 24] [--kill-at 19]
        [--checkpoint-every 10] [--n-embd 128] [--n-layer 2] [--spares 1]

It prints one JSON object to stdout (both modes' figures, their medians and the ratios copies / disk);
everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kill_probe import install_probe as install_kill_probe
from recovery import job_overrides as ddp_job_overrides
from recovery import (
    machine,
    run_toolkit,
    stdout_to_stderr,
    summary,
)

#: The two ways back, by their value of fault_tolerance.shard_copy_interval_steps.
MODES = {"shard_copies": 1, "disk": 0}


def ray_resources(args: argparse.Namespace) -> dict[str, Any]:
    """A simulated slot for each rank and spare (as ``recovery.ray_resources``, with this run's spares)."""
    slots = float(args.workers + args.spares)
    return {"num_cpus": 2, "resources": {"sim_npu": slots, "sim_cuda": slots}}


def job_overrides(args: argparse.Namespace, mode: str) -> list[str]:
    """``recovery.py``'s job, sharded, with this run's model, checkpoint cadence and way back."""
    ours = {
        "train.parallelism": "fsdp",
        "model.n_layer": str(args.n_layer),
        "model.n_embd": str(args.n_embd),
        "checkpoint.interval_steps": str(args.checkpoint_every),
        "fault_tolerance.shard_copy_interval_steps": str(MODES[mode]),
        "cluster.spares": str(args.spares),
    }
    base = [
        o for o in ddp_job_overrides(args.steps, args.kill_at, args.workers) if o.split("=")[0] not in ours
    ]
    return [*base, *(f"{k}={v}" for k, v in ours.items())]


def more_figures(kill_at: int) -> Any:
    def more(events: list[dict[str, Any]], kill_t: float) -> dict[str, Any]:
        beats = [
            e for e in events if e["event"] == "heartbeat" and e["time"] > kill_t and e["step"] >= kill_at
        ]
        copies = [e for e in events if e["event"] == "shard_copies"]
        return {
            "back_to_step_s": beats[0]["time"] - kill_t if beats else None,
            "copy_s": statistics.median(e["copy_s"] for e in copies) if copies else None,
            "copy_bytes": copies[-1]["bytes"] if copies else None,
        }

    return more


def interleave(args: argparse.Namespace, base: Path, kill_log: Path) -> dict[str, list[dict[str, Any]]]:
    from trainer.testing.configs import make_config

    configs = {mode: make_config(*job_overrides(args, mode)) for mode in MODES}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode, config in configs.items():
            started = time.monotonic()
            try:
                figures = run_toolkit(config, base, kill_log, more_figures(args.kill_at))
            except Exception as exc:  # keep the other runs; the failure is reported in the JSON
                figures = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            figures["run_wall_s"] = time.monotonic() - started
            runs[mode].append(figures)
            said = figures.get("error") or (
                f"MTTR {figures['mttr_s']:.3f} s, back to step {args.kill_at} in "
                f"{figures['back_to_step_s']:.3f} s, from {figures['state_from']}"
            )
            print(f"[{repeat + 1}/{args.repeats}] {mode}: {said}", file=sys.stderr)
    return runs


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
    return statistics.median(values) if values else None


def result_json(
    args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], wall: float
) -> dict[str, Any]:
    by_mode = {mode: summary(r) for mode, r in runs.items()}
    medians = {
        mode: {
            key: _median(r, key) for key in ("mttr_s", "back_to_step_s", "recover_s", "detect_s", "copy_s")
        }
        for mode, r in runs.items()
    }

    def ratio(key: str) -> float | None:
        a, b = medians["shard_copies"][key], medians["disk"][key]
        return None if a is None or not b else a / b

    return {
        "benchmark": "recovery_fsdp",
        "definition": (
            "mttr_s: SIGKILL of rank 1 (time.time() in the victim) to the journal's first_step_after_recovery; "
            "back_to_step_s: SIGKILL to the first heartbeat at or past the step in flight at the kill; "
            "ratio_*: median with shard copies / median restoring from the newest checkpoint (disk)"
        ),
        "settings": {
            "workers": args.workers,
            "repeats": args.repeats,
            "steps": args.steps,
            "kill_at_step": args.kill_at,
            "order": "interleaved " + ", ".join(MODES) + " per repeat",
            "local_ray": ray_resources(args),
            "overrides": {mode: job_overrides(args, mode) for mode in MODES},
        },
        "by_mode": by_mode,
        "medians": medians,
        "ratio_mttr": ratio("mttr_s"),
        "ratio_back_to_step": ratio("back_to_step_s"),
        "copy_bytes": _median(runs["shard_copies"], "copy_bytes"),
        "machine": {**machine(), "load_avg_at_end": os.getloadavg()},
        "wall_s": wall,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=4, help="ranks of the sharded group (3 or more)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode (interleaved)")
    parser.add_argument("--steps", type=int, default=24, help="training steps per run")
    parser.add_argument("--kill-at", type=int, default=19, help="rank 1 is killed just before this step")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint.interval_steps")
    parser.add_argument("--n-embd", type=int, default=128, help="model.n_embd (the state's size)")
    parser.add_argument("--n-layer", type=int, default=2, help="model.n_layer")
    parser.add_argument(
        "--spares",
        type=int,
        default=1,
        help="cluster.spares (warm spares; a second lost rank would otherwise start cold)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 1 < args.kill_at <= args.steps or args.workers < 2:
        parser.error("need --repeats >= 1, 1 < --kill-at <= --steps and --workers >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="rbf-", dir="/tmp"))
    try:
        with stdout_to_stderr():
            kill_log = install_kill_probe(base)
            ray.init(
                **ray_resources(args),
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=str(base / "ray"),
            )
            try:
                runs = interleave(args, base, kill_log)
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result_json(args, runs, time.monotonic() - started), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
