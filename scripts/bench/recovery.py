"""Mean time to recovery (MTTR) after losing one of N workers: this toolkit versus Ray Train v2, per N.

MTTR is measured from the SIGKILL of rank 1 to the next completed training step of the group. Both systems
train the same job on one shared local Ray (2 CPUs): ``trainer.model.GPT`` with 1 layer, 32 wide,
sequences of 16, AdamW with gradient clipping, a global batch of 8 from ``trainer.data.SyntheticCorpus``
sliced by ``GlobalBatchSampler`` (8/N per worker), DDP over gloo, one torch thread per worker, and
``CPU_PER_WORKER`` logical CPUs per worker (so that N workers and a warm spare fit on 2 CPUs).

(a) toolkit: ``trainer.job.run`` with ``cluster=ray_local device=sim_npu cluster.chunk_steps=1
    cluster.workers=N`` (one warm spare) and the injected fault ``faults.kill_rank=1 faults.kill_at_step=K``
    (rank 1 SIGKILLs itself just before step K).
    The end is the journal's ``first_step_after_recovery`` entry, written by the controller when the
    first post-recovery heartbeat (the re-run of step K) reaches the driver.
(b) Ray Train v2 ``TorchTrainer`` (``RAY_TRAIN_V2_ENABLED=1``) in its best configuration
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2``), ``FailureConfig(max_failures=3)``, DDP by
    ``ray.train.torch.prepare_model``, a checkpoint reported every step; rank 1 SIGKILLs itself just before
    step K of the first attempt (a marker file makes it one-shot). The end is the first step completed by
    rank 0 (time taken right after ``loss.item()``, before ``ray.train.report``) after the kill.

The kill time is taken the same way for both, inside the victim: the benchmark puts a ``sitecustomize``
probe on the ``PYTHONPATH`` of the Ray processes it starts, which wraps ``os.kill`` so that a process
SIGKILLing itself first appends ``time.time()`` to a log (Linux; no toolkit code is changed, and the
driver process is not affected). Ray Train's worker also writes its own time stamp, as a cross-check.

Runs are interleaved A B A B ... per N on one local Ray (``num_cpus=2``, advertising a sim_npu slot for
each worker and spare of the largest N); each run lives in its own temporary directory, removed afterwards.
Run from the repository root::

    .venv/bin/python scripts/bench/recovery.py [--workers 2 4 8] [--repeats 3] [--steps 10] [--kill-at 5]
        [--systems toolkit ray_train]

``--systems toolkit`` measures the toolkit alone (its scaling over N; no ratio to Ray Train is reported).

It prints one JSON object to stdout (per N: both systems' MTTR and their ratio); everything else (Ray, the
trainer's own output) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kill_probe import install_probe, take_kills, the_kill  # this script's directory: on the path
from recovery_ray_train import run_ray_train

if TYPE_CHECKING:
    from trainer.config import Config

GOAL_RATIO_MAX = 0.2
GOAL_SECONDS_MAX = 5.0
#: The toolkit's MTTR at the largest N over its MTTR at the smallest.
GOAL_SCALING_MAX = 1.5
HEALTH_CHECK_INTERVAL_S = "0.2"
#: Logical CPUs each worker of either system asks for: 8 workers and a spare fit on 2 CPUs.
CPU_PER_WORKER = 0.2
SPARES = 1


def job_overrides(steps: int, kill_at: int, workers: int = 2) -> list[str]:
    return [
        "cluster=ray_local",
        "device=sim_npu",
        f"cluster.workers={workers}",
        f"cluster.spares={SPARES}",
        f"cluster.cpus_per_worker={CPU_PER_WORKER}",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.seq_len=16",
        "train.global_batch_size=8",
        f"train.steps={steps}",
        "faults.kill_rank=1",
        f"faults.kill_at_step={kill_at}",
        "cluster.chunk_steps=1",
        "monitoring=off",
    ]


# --- (a) the toolkit ----------------------------------------------------------------------------------
def run_toolkit(
    config: Config,
    base: Path,
    kill_log: Path,
    more: Callable[[list[dict[str, Any]], float], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One toolkit run: its :func:`toolkit_figures`, and ``more(journal events, kill time)`` if given."""
    from trainer.job import run
    from trainer.journal import Journal

    take_kills(kill_log)
    run_dir = Path(tempfile.mkdtemp(prefix="toolkit-", dir=base))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
            code = run(config, run_dir=run_dir)
        events = Journal(run_dir / "journal.jsonl").read()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    kill_t = the_kill(take_kills(kill_log))
    return {**toolkit_figures(events, kill_t, int(code)), **(more(events, kill_t) if more else {})}


def toolkit_figures(events: list[dict[str, Any]], kill_t: float, code: int) -> dict[str, Any]:
    def first(name: str, **match: Any) -> dict[str, Any]:
        found = [e for e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items())]
        if not found:
            raise RuntimeError(
                f"toolkit journal has no {name!r} event {match} (exit code {code}): {events[-3:]}"
            )
        return found[0]

    # Other findings may come first (a preflight probe reading a link as degraded on a busy host).
    failure = first("failure", kind="worker_lost")
    recovered, after = first("recovered"), first("first_step_after_recovery")
    if kill_t > failure["time"]:
        raise RuntimeError(
            f"the kill ({kill_t}) is logged after the failure was detected ({failure['time']})"
        )
    return {
        "mttr_s": after["time"] - kill_t,
        "detect_s": failure["time"] - kill_t,
        "recover_s": recovered["recover_s"],
        "detection_to_step_s": after["failure_to_step_s"],
        "failure_kind": failure["kind"],
        "state_from": recovered["state_from"],
        "replaced_ranks": recovered["replaced_ranks"],
        "resumed_at_step": recovered["step"],
        "exit_code": code,
    }


# --- driver -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python or C, this process or its children) to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures over the runs that measured something; failed runs are listed, not averaged."""
    values = [r["mttr_s"] for r in runs if "error" not in r]
    return {
        "mttr_s": values,
        "median_s": statistics.median(values) if values else None,
        "mean_s": statistics.fmean(values) if values else None,
        "min_s": min(values, default=None),
        "max_s": max(values, default=None),
        "failed_runs": len(runs) - len(values),
        "runs": runs,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def interleave(
    args: argparse.Namespace, workers: int, base: Path, kill_log: Path
) -> dict[str, list[dict[str, Any]]]:
    from trainer.testing.configs import make_config

    # Composed once: the repository may change under a long run; every run measures the same job.
    config = make_config(*job_overrides(args.steps, args.kill_at, workers))
    systems = {name: SYSTEMS[name] for name in args.systems}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for repeat in range(args.repeats):
        for name, fn in systems.items():
            started = time.monotonic()
            try:
                figures = fn(config, base, kill_log)
            except Exception as exc:  # keep the other runs; the failure is reported in the JSON
                figures = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            figures["run_wall_s"] = time.monotonic() - started
            runs[name].append(figures)
            said = figures.get("error") or f"MTTR {figures['mttr_s']:.3f} s"
            print(f"[N={workers} {repeat + 1}/{args.repeats}] {name}: {said}", file=sys.stderr)
    return runs


SYSTEMS: dict[str, Callable[[Config, Path, Path], dict[str, Any]]] = {
    "toolkit": run_toolkit,
    "ray_train": functools.partial(run_ray_train, cpu_per_worker=CPU_PER_WORKER),
}

DEFINITION = (
    "MTTR = wall time (time.time(), one host) from the SIGKILL of rank 1 of N to the next completed "
    "training step. Kill time, both systems: time.time() inside the victim immediately before "
    "os.kill(own pid, SIGKILL), logged by a sitecustomize probe wrapping os.kill in every Ray worker process. "
    "Toolkit: the kill is its own fault injection (faults.kill_rank=1, faults.kill_at_step=K: just before "
    "step K); the end is the journal time of 'first_step_after_recovery' (the driver holds the heartbeat "
    "of the re-run step K; cluster.chunk_steps=1). Breakdown: detect_s = journal 'failure' time - kill "
    "time; recover_s = the journal's 'recovered' recover_s (replace, peer snapshot, re-form); "
    "detection_to_step_s = the journal's failure_to_step_s, measured from failure "
    "detection. Ray Train: rank 1 SIGKILLs itself just before step K of the first attempt; the end is "
    "time.time() on rank 0 right after loss.item() of the first step completed after the kill, before "
    "ray.train.report (in the worker, not at the driver: this favours Ray Train by the report/heartbeat "
    "latency). ratio = toolkit mean / Ray Train mean at the same N; goal_seconds_met: toolkit mean <= "
    "goal_seconds_max; scaling = toolkit mean at the largest N / toolkit mean at the smallest N "
    "(scaling_median: the same with medians)."
)


def per_workers(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    toolkit, ray_train = summary(runs.get("toolkit", [])), summary(runs.get("ray_train", []))
    ratio = _ratio(toolkit["mean_s"], ray_train["mean_s"])
    return {
        "toolkit": toolkit,
        "ray_train": ray_train,
        "ratio": ratio,
        "ratio_median": _ratio(toolkit["median_s"], ray_train["median_s"]),
        "goal_ratio_met": ratio is not None and ratio <= GOAL_RATIO_MAX,
        "goal_seconds_met": toolkit["mean_s"] is not None and toolkit["mean_s"] <= GOAL_SECONDS_MAX,
    }


def result_json(
    args: argparse.Namespace, runs: dict[int, dict[str, list[dict[str, Any]]]], wall: float
) -> dict[str, Any]:
    by_n = {n: per_workers(r) for n, r in runs.items()}
    smallest, largest = by_n[min(by_n)]["toolkit"]["mean_s"], by_n[max(by_n)]["toolkit"]["mean_s"]
    scaling = _ratio(largest, smallest) if len(by_n) > 1 else None
    low, high = by_n[min(by_n)]["toolkit"]["median_s"], by_n[max(by_n)]["toolkit"]["median_s"]
    scaling_median = _ratio(high, low) if len(by_n) > 1 else None
    return {
        "benchmark": "recovery",
        "definition": DEFINITION,
        "settings": {
            "workers": list(by_n),
            "repeats": args.repeats,
            "steps": args.steps,
            "kill_at_step": args.kill_at,
            "systems": args.systems,
            "order": "per N, interleaved " + ", ".join(args.systems) + " per repeat",
            "local_ray": ray_resources(max(by_n)),
            "toolkit_overrides": job_overrides(args.steps, args.kill_at, max(by_n)),
            "ray_train": {
                "version": "v2 (RAY_TRAIN_V2_ENABLED=1)",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S,
                "scaling": f"num_workers=N, use_gpu=False, resources_per_worker={{'CPU': {CPU_PER_WORKER}}}",
                "failure_config": "max_failures=3",
                "checkpoint": "rank 0 reports a checkpoint every step (num_to_keep=2)",
            },
        },
        "by_workers": {str(n): figures for n, figures in by_n.items()},
        "summary": {
            str(n): {
                "toolkit_mean_s": f["toolkit"]["mean_s"],
                "toolkit_median_s": f["toolkit"]["median_s"],
                "ray_train_mean_s": f["ray_train"]["mean_s"],
                "ratio": f["ratio"],
            }
            for n, f in by_n.items()
        },
        "scaling": scaling,
        "scaling_median": scaling_median,
        "goal_ratio_max": GOAL_RATIO_MAX,
        "goal_seconds_max": GOAL_SECONDS_MAX,
        "goal_scaling_max": GOAL_SCALING_MAX,
        "goal_ratio_met": all(f["goal_ratio_met"] for f in by_n.values()),
        "goal_seconds_met": all(f["goal_seconds_met"] for f in by_n.values()),
        "goal_scaling_met": scaling is not None and scaling <= GOAL_SCALING_MAX,
        "machine": machine(),
        "wall_s": wall,
    }


def ray_resources(workers: int) -> dict[str, Any]:
    """What the benchmark's local Ray advertises: a simulated slot for each worker and spare of the largest
    N (the toolkit's group asks for one per actor; Ray Train's workers ask for CPU only)."""
    slots = float(workers + SPARES)
    return {"num_cpus": 2, "resources": {"sim_npu": slots, "sim_cuda": slots}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2], help="group sizes N to measure (e.g. 2 4 8)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system per N (interleaved)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--kill-at", type=int, default=5, help="rank 1 is killed just before this step")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=sorted(SYSTEMS),
        default=list(SYSTEMS),
        help="what to measure (default both; toolkit alone for its scaling over N)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 1 < args.kill_at <= args.steps:
        parser.error("need --repeats >= 1 and 1 < --kill-at <= --steps")
    args.systems = [name for name in SYSTEMS if name in args.systems]
    if any(n < 2 or 8 % n for n in args.workers):
        parser.error("each --workers N must be >= 2 and divide the global batch of 8 (2, 4 or 8)")
    args.workers = sorted(set(args.workers))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Both must be in the environment before Ray starts (its processes inherit it) and ray.train is imported.
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = HEALTH_CHECK_INTERVAL_S
    import ray

    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    try:
        with stdout_to_stderr():
            kill_log = install_probe(base)
            ray.init(
                **ray_resources(max(args.workers)),
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=str(base / "ray"),
            )
            try:
                runs = {n: interleave(args, n, base, kill_log) for n in args.workers}
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result_json(args, runs, time.monotonic() - started), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
