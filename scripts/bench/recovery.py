"""Mean time to recovery (MTTR) after losing one of two workers: this toolkit versus Ray Train v2.

MTTR is measured from the SIGKILL of rank 1 to the next completed training step of the group. Both systems
train the same job on one shared local Ray (2 CPUs): ``trainer.model.GPT`` with 1 layer, 32 wide,
sequences of 16, AdamW with gradient clipping, a global batch of 8 from ``trainer.data.SyntheticCorpus``
sliced by ``GlobalBatchSampler`` (4 per worker), DDP over gloo, one torch thread per worker.

(a) toolkit: ``trainer.job.run`` with ``cluster=ray_local device=sim_npu cluster.chunk_steps=1`` and the
    injected fault ``faults.kill_rank=1 faults.kill_at_step=K`` (rank 1 SIGKILLs itself just before step K).
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

Runs are interleaved A B A B ... on one local Ray (``num_cpus=2``); each run lives in its own temporary
directory, removed afterwards. Run from the repository root::

    .venv/bin/python scripts/bench/recovery.py [--repeats 3] [--steps 10] [--kill-at 5]

It prints one JSON object to stdout; everything else (Ray, the trainer's own output) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.config import Config

GOAL_RATIO_MAX = 0.25
GOAL_SECONDS_MAX = 5.0
HEALTH_CHECK_INTERVAL_S = "0.2"


def job_overrides(steps: int, kill_at: int) -> list[str]:
    return [
        "cluster=ray_local",
        "device=sim_npu",
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


# --- the kill-time probe ------------------------------------------------------------------------------
KILL_LOG_ENV = "RECOVERY_BENCH_KILL_LOG"
PROBE = f"""\
# Written by scripts/bench/recovery.py: log the time a process SIGKILLs itself, just before it does.
import os as _os
import time as _time

_LOG = _os.environ.get("{KILL_LOG_ENV}")
if _LOG:
    _real_kill = _os.kill

    def _logged_kill(pid, sig, _real_kill=_real_kill, _log=_LOG):
        if sig == 9 and pid == _os.getpid():
            with open(_log, "a") as f:
                f.write(repr(_time.time()) + " " + str(pid) + "\\n")
        _real_kill(pid, sig)

    _os.kill = _logged_kill
"""


def install_probe(base: Path) -> Path:
    """Put the probe on the PYTHONPATH that Ray's processes will inherit; returns the kill log's path."""
    probe_dir = base / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    log = base / "kills.log"
    os.environ[KILL_LOG_ENV] = str(log)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(probe_dir), os.environ.get("PYTHONPATH")) if p)
    return log


def take_kills(log: Path) -> list[tuple[float, int]]:
    """The kills logged since the last call, oldest first (the log is emptied)."""
    if not log.exists():
        return []
    moved = log.with_suffix(".read")
    log.rename(moved)  # writers open the log per kill, so later kills start a new file
    kills = sorted(
        (float(t), int(pid)) for t, pid in (line.split() for line in moved.read_text().splitlines())
    )
    moved.unlink()
    return kills


def the_kill(kills: list[tuple[float, int]]) -> float:
    if len(kills) != 1:
        raise RuntimeError(f"expected exactly one logged self-SIGKILL in the run, got {kills}")
    return kills[0][0]


# --- (a) the toolkit ----------------------------------------------------------------------------------
def run_toolkit(config: Config, base: Path, kill_log: Path) -> dict[str, Any]:
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
    return toolkit_figures(events, the_kill(take_kills(kill_log)), int(code))


def toolkit_figures(events: list[dict[str, Any]], kill_t: float, code: int) -> dict[str, Any]:
    def first(name: str) -> dict[str, Any]:
        found = [e for e in events if e["event"] == name]
        if not found:
            raise RuntimeError(f"toolkit journal has no {name!r} event (exit code {code}): {events[-3:]}")
        return found[0]

    failure, recovered, after = first("failure"), first("recovered"), first("first_step_after_recovery")
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
        "resumed_at_step": recovered["step"],
        "exit_code": code,
    }


# --- (b) Ray Train v2 ---------------------------------------------------------------------------------
def _ray_train_restore(module: Any, optimizer: Any) -> int:
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", weights_only=True)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _ray_train_report(step: int, loss: float, module: Any, optimizer: Any, rank: int) -> None:
    import ray.train
    import torch

    metrics = {"step": step, "loss": loss}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        torch.save(state, Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _ray_train_maybe_kill(cfg: dict[str, Any], rank: int, step: int) -> None:
    """Rank 1 SIGKILLs itself just before step ``kill_at`` (1-based), in the first attempt only."""
    out = Path(cfg["out_dir"])
    if rank != 1 or step + 1 != cfg["kill_at"] or (out / "killed").exists():
        return
    (out / "killed").touch()
    with open(out / "kill_time", "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def ray_train_loop(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: the toolkit's model, data, optimizer and step, with Ray Train's DDP."""
    import ray.train
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from ray.train.torch import prepare_model

    from trainer.data import GlobalBatchSampler

    job = cfg["job"]
    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(job["train"]["seed"])
    module = instantiate(job["model"])
    optimizer = instantiate(job["optim"])(module.parameters())
    step = _ray_train_restore(module, optimizer)
    model = prepare_model(module)
    data = instantiate(job["data"])
    sampler = GlobalBatchSampler(job["train"]["global_batch_size"], rank, world)
    while step < job["train"]["steps"]:
        _ray_train_maybe_kill(cfg, rank, step)
        tokens = data.batch(sampler.indices(step))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), job["train"]["grad_clip"])
        optimizer.step()
        value = float(loss.item())
        step += 1
        if rank == 0:
            with open(Path(cfg["out_dir"]) / "steps", "a") as f:
                f.write(f"{time.time()!r} {step} {os.getpid()}\n")
        _ray_train_report(step, value, module, optimizer, rank)


def run_ray_train(config: Config, base: Path, kill_log: Path) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.config import to_container

    take_kills(kill_log)
    out = Path(tempfile.mkdtemp(prefix="raytrain-", dir=base))
    kill_at = config.faults.kill_at_step
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"job": to_container(config), "kill_at": kill_at, "out_dir": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name="recovery-bench",
            storage_path=str(out / "storage"),
            failure_config=FailureConfig(max_failures=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
        own_stamp = float((out / "kill_time").read_text())
        lines = [line.split() for line in (out / "steps").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    kill_t = the_kill(take_kills(kill_log))
    figures = ray_train_figures(lines, kill_t, result.metrics or {}, config.train.steps)
    return {**figures, "own_stamp_to_probe_s": kill_t - own_stamp}


def ray_train_figures(
    lines: list[list[str]], kill_t: float, metrics: dict[str, Any], steps: int
) -> dict[str, Any]:
    done = [(float(t), int(s), int(pid)) for t, s, pid in lines]
    after = [d for d in done if d[0] > kill_t]
    if not after:
        raise RuntimeError(f"Ray Train completed no step after the kill (final metrics {metrics})")
    return {
        "mttr_s": after[0][0] - kill_t,
        "resumed_at_step": after[0][1] - 1,
        "steps_repeated": sum(1 for d in done if d[0] < kill_t) - (after[0][1] - 1),
        "new_process": after[0][2] not in {d[2] for d in done if d[0] < kill_t},
        "final_step": metrics.get("step"),
        "finished": metrics.get("step") == steps,
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


def interleave(args: argparse.Namespace, base: Path, kill_log: Path) -> dict[str, list[dict[str, Any]]]:
    from trainer.testing.configs import make_config

    # Composed once: the repository may change under a long run; every run measures the same job.
    config = make_config(*job_overrides(args.steps, args.kill_at))
    systems: dict[str, Callable[[Config, Path, Path], dict[str, Any]]] = {
        "toolkit": run_toolkit,
        "ray_train": run_ray_train,
    }
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
            print(f"[{repeat + 1}/{args.repeats}] {name}: {said}", file=sys.stderr)
    return runs


DEFINITION = (
    "MTTR = wall time (time.time(), one host) from the SIGKILL of rank 1 of 2 to the next completed "
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
    "latency). ratio = toolkit mean / Ray Train mean; goal_seconds_met: toolkit mean <= goal_seconds_max."
)


def result_json(
    args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], wall: float
) -> dict[str, Any]:
    toolkit, ray_train = summary(runs["toolkit"]), summary(runs["ray_train"])
    ratio = _ratio(toolkit["mean_s"], ray_train["mean_s"])
    return {
        "benchmark": "recovery",
        "definition": DEFINITION,
        "settings": {
            "repeats": args.repeats,
            "steps": args.steps,
            "kill_at_step": args.kill_at,
            "order": "interleaved toolkit, ray_train per repeat",
            "toolkit_overrides": job_overrides(args.steps, args.kill_at),
            "ray_train": {
                "version": "v2 (RAY_TRAIN_V2_ENABLED=1)",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S,
                "scaling": "num_workers=2, use_gpu=False, resources_per_worker={'CPU': 0.5}",
                "failure_config": "max_failures=3",
                "checkpoint": "rank 0 reports a checkpoint every step (num_to_keep=2)",
            },
        },
        "toolkit": toolkit,
        "ray_train": ray_train,
        "ratio": ratio,
        "ratio_median": _ratio(toolkit["median_s"], ray_train["median_s"]),
        "goal_ratio_max": GOAL_RATIO_MAX,
        "goal_seconds_max": GOAL_SECONDS_MAX,
        "goal_ratio_met": ratio is not None and ratio <= GOAL_RATIO_MAX,
        "goal_seconds_met": toolkit["mean_s"] is not None and toolkit["mean_s"] <= GOAL_SECONDS_MAX,
        "machine": machine(),
        "wall_s": wall,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system (interleaved)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--kill-at", type=int, default=5, help="rank 1 is killed just before this step")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 1 < args.kill_at <= args.steps:
        parser.error("need --repeats >= 1 and 1 < --kill-at <= --steps")
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
                num_cpus=2,
                resources={"sim_npu": 4, "sim_cuda": 4},
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
