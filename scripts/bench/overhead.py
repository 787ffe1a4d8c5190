"""Per-step overhead of the toolkit (Ray actors, heartbeats, journal, Prometheus exporter) against a plain
torch DDP loop on the same model, batch and worker count, measured in the same run.

* **toolkit**: ``trainer.job.run`` with ``cluster=ray_local`` (2 workers, gloo), the Prometheus exporter on,
  checkpoints and probes off; steady-state seconds per step = wall time between two heartbeats of the
  journal ÷ the steps between them (start-up and the first chunks excluded).
* **plain DDP**: 2 processes started with ``torch.multiprocessing``, gloo, ``DistributedDataParallel`` over
  the same GPT, the same synthetic samples, AdamW, gradient clipping; seconds per step over the same number
  of steady-state steps.

With ``--example NAME`` both sides train a task of ``examples/`` instead (``+task._target_=…`` with the
sizes in :data:`EXAMPLES`, chosen so that one step takes ≥ 10 ms on the 2-core host): the plain side is the
same task's code in a plain DDP loop (``plain_task_loop.py``: its model, optimizer, scheduler, dataset,
collate and loss or ``train_step``; an epoch-seeded permutation sliced per rank; the toolkit config's
``train.grad_clip``). ``lm_tokens`` first builds its token file from the standard library's source into a
temp dir, as its README does. Ray runs from the repository root, so that its workers import ``examples``.
The JSON then also names the ``example`` and its ``task`` class, gives the task's sizes under ``model``
(and the token counts under ``data`` for ``lm_tokens``); ``example`` is null for the built-in GPT.

With ``--in-process`` the toolkit side is its ranks' own steps without Ray and the driver (``worker_loop.py``:
each rank's ``Worker`` in a spawned gloo process, losses read once per ``--chunk`` steps): the difference
between that figure and the Ray run's is what Ray, the driver and the chunks cost.

With ``--device cpu|cuda`` it measures one worker on one device instead: the toolkit in-process and on Ray
against a plain loop of the same model without a per-step host read (``single_worker.py``, whose docstring
says what a GPU machine needs installed).

Interleaved A B A B …; prints JSON with medians and ``ratio`` = toolkit ÷ plain (goal ≤ 1.02), and — for
the two-worker runs, on Linux — the host's cpu-seconds during each side's steady state as shares
(``host_cpu.py``, sampling both sides alike, so both pay for its reading): the ranks', everyone else's (for
the toolkit Ray's daemons and the driver), idle. Where the ranks use every core, what the toolkit's others
take beyond the plain loop's can be taken from its ranks: a bound on that part of the ratio, not a measure
of it (other work also fits where the cores idle).

    .venv/bin/python scripts/bench/overhead.py [--steps 120] [--repeats 3]
    .venv/bin/python scripts/bench/overhead.py --example digits|lm_tokens|snippets [--steps 120] [--repeats 3]
        [--chunk 10 | --chunk-s 1] [--in-process]
    .venv/bin/python scripts/bench/overhead.py --device cpu|cuda [--steps 120] [--repeats 3] [--fused]
        [--profile FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import single_worker  # this script's directory: on the path when the script runs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from host_cpu import CpuSampler  # this script's directory: on the path when the script runs
from plain_task_loop import (
    PlainRun,  # this script's directory: on the path when the script runs
    is_spawned_rank,
    put_steady,
    spawned_step_s,
    steady_start,
)
from plain_task_loop import plain_step_s as plain_task_step_s
from worker_loop import WorkerRun, worker_rank  # this script's directory: on the path when the script runs

from trainer.config import ClusterConfig, Config
from trainer.data import GlobalBatchSampler, SyntheticCorpus
from trainer.job import run
from trainer.journal import Journal
from trainer.model import GPT
from trainer.testing.configs import make_config
from trainer.testing.local_ray import local_ray

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # ``examples`` is a package of the repository, not of the installed project

MODEL = {"vocab_size": 256, "seq_len": 64, "n_layer": 2, "n_head": 4, "n_embd": 128}
BATCH = 16
WARMUP_STEPS = 20


@dataclass(frozen=True)
class Example:
    """A task of ``examples/`` sized for the benchmark: its constructor's arguments and the global batch."""

    target: str
    task_args: dict[str, Any]
    global_batch: int


#: Sizes where one step takes ≥ 10 ms on the 2-core host with 2 workers (one thread each): the digits MLP
#: at 1024 wide on 512 images a rank, the LM at the built-in GPT's sizes, the snippet classifier at 64
#: channels on full 64-byte snippets (``min_len=64``: the curriculum does not change the step's cost mid-run).
EXAMPLES = {
    "digits": Example("examples.digits.task.DigitsTask", {"hidden": 1024}, 1024),
    "lm_tokens": Example(
        "examples.lm_tokens.task.TokenFileTask",
        {"seq_len": 64, "n_layer": 2, "n_head": 4, "n_embd": 128},
        16,
    ),
    "snippets": Example("examples.snippets.task.SnippetTask", {"width": 64, "min_len": 64}, 64),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toolkit_config(steps: int, chunk: int, workload: list[str], chunk_s: float = 0.0) -> Config:
    """The toolkit's run: 2 workers on a local Ray, the Prometheus exporter on, checkpoints, probes and
    the final evaluation off; ``workload`` selects the model or task and the global batch; chunks of
    ``chunk`` steps, or of ``chunk_s`` seconds (``cluster.chunk_s``)."""
    return make_config(
        "cluster=ray_local",
        "device=sim_npu",
        f"train.steps={steps}",
        "checkpoint.interval_steps=0",
        "probes.preflight=false",
        f"cluster.chunk_steps={chunk}",
        f"cluster.chunk_s={chunk_s}",
        "monitoring.port=0",
        *workload,
    )


def toolkit_step_s(config: Config) -> tuple[float, float, dict[str, Any]]:
    """Steady-state seconds per step of the toolkit's run; of those, the seconds per step its ranks spent
    outside their steps (the wall time between two heartbeats less the steps' own time: a rank waiting for
    the driver at a chunk's end shows here); and the host's cpu-seconds over the same window as shares:
    the two ranks', every other process's (Ray's daemons, the driver; the most by name), idle."""
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        with contextlib.redirect_stdout(sys.stderr), CpuSampler(_is_rank) as cpu:  # stdout: the JSON only
            run(config, run_dir=work)
        beats = [e for e in Journal(work / "journal.jsonl").read() if e["event"] == "heartbeat"]
        steady = [b for b in beats if b["first_step"] > WARMUP_STEPS]
        if len(steady) < 3:  # long chunks (--chunk-s) over too few steps: no steady window to time
            raise SystemExit(
                f"--steps={config.train.steps}: {len(steady)} heartbeats after the {WARMUP_STEPS} warm-up steps "
                f"(chunks of {config.cluster.chunk_s} s); give more steps"
            )
        first, last = steady[0], steady[-1]
        steps = last["step"] - first["step"]
        step_s = (last["time"] - first["time"]) / steps
        outside_s = step_s - sum(b["busy_s"] for b in steady[1:]) / steps
        return step_s, outside_s, cpu.shares(first["time"], last["time"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _is_rank(cmdline: str) -> bool:
    """A process of a training rank: Ray titles an actor's process by its class."""
    return cmdline.startswith("ray::WorkerActor")


def gpt_workload() -> list[str]:
    return [f"train.global_batch_size={BATCH}", *[f"model.{k}={v}" for k, v in MODEL.items()]]


def example_workload(example: Example, task_args: dict[str, Any]) -> list[str]:
    return [
        f"+task._target_={example.target}",
        *[f"+task.{k}={v}" for k, v in task_args.items()],
        f"train.global_batch_size={example.global_batch}",
        "train.eval_samples=0",
    ]


def prepare_tokens(out: Path) -> dict[str, Any]:
    """The LM example's token files from the standard library's source, built as its README says."""
    subprocess.run(
        [sys.executable, "-m", "examples.lm_tokens.prepare", "--out", str(out)],
        cwd=REPO,
        check=True,
        stdout=sys.stderr,
        timeout=300,
    )
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return meta


def _plain_worker(rank: int, world: int, port: int, steps: int, out: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(GPT(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data, sampler = (
        SyntheticCorpus(0, MODEL["vocab_size"], MODEL["seq_len"]),
        GlobalBatchSampler(BATCH, rank, world),
    )
    start = steady_start()
    for step in range(steps):
        if step == WARMUP_STEPS:
            start = steady_start()
        tokens = data.batch(sampler.indices(step))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
    if rank == 0:
        put_steady(out, start, steps - WARMUP_STEPS)
    dist.destroy_process_group()


def plain_step_s(steps: int, world: int = 2) -> tuple[float, tuple[float, float]]:
    return spawned_step_s(_plain_worker, steps, _free_port(), world)


def sampled(plain: Callable[[], tuple[float, tuple[float, float]]]) -> tuple[float, dict[str, Any]]:
    """A plain run under the same CPU sampler as the toolkit's (both pay its reading): seconds per step, and
    the host's shares over its steady window."""
    with CpuSampler(is_spawned_rank) as cpu:
        step_s, (start, end) = plain()
    return step_s, cpu.shares(start, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=10, help="cluster.chunk_steps of the toolkit run")
    parser.add_argument(
        "--chunk-s",
        type=float,
        default=0.0,
        help="cluster.chunk_s of the toolkit's two-worker run: chunks of this many seconds (0: --chunk steps)",
    )
    parser.add_argument(
        "--example",
        choices=sorted(EXAMPLES),
        default=None,
        help="a task of examples/ (default: the built-in GPT)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="the toolkit's ranks without Ray and the driver: its Worker's steps in spawned gloo processes",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="one worker on this device: toolkit in-process and on Ray against a plain loop",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="with --device: AdamW's fused kernel in every loop (the toolkit's step then skips on the device)",
    )
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=ClusterConfig().local_worker_niceness,
        help="nice value of the local Ray's workers (cluster.local_worker_niceness; 15: Ray's own default)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="with --device: then profile one plain and one in-process run, top operators to this file",
    )
    args = parser.parse_args()
    if args.device is not None:
        measured = single_worker.measure(
            args.device, args.steps, args.repeats, args.chunk, args.fused, args.worker_niceness
        )
        print(json.dumps(measured, indent=2))
        if args.profile is not None:
            single_worker.profile(args.device, min(args.steps, 60), args.chunk, args.fused, args.profile)
        return
    if args.steps < WARMUP_STEPS + 2 * args.chunk:  # two heartbeats after the warm-up, or nothing to time
        parser.error(f"--steps={args.steps}: must be at least {WARMUP_STEPS} warm-up steps + 2 * --chunk")
    os.chdir(REPO)  # Ray's workers import ``examples`` from the directory Ray was started in
    scratch = Path(tempfile.mkdtemp(prefix="bench-overhead-data-"))
    try:
        result = measure(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Interleaved toolkit and plain runs of the chosen workload; the JSON result."""
    described: dict[str, Any] = {"example": args.example}
    if args.example is None:
        config = toolkit_config(args.steps, args.chunk, gpt_workload(), args.chunk_s)
        batch, sizes = BATCH, dict(MODEL)

        def plain() -> tuple[float, tuple[float, float]]:
            return plain_step_s(args.steps)
    else:
        example = EXAMPLES[args.example]
        task_args = dict(example.task_args)
        if args.example == "lm_tokens":
            described["data"] = prepare_tokens(scratch / "tokens")
            task_args["data_dir"] = str(scratch / "tokens")
        config = toolkit_config(args.steps, args.chunk, example_workload(example, task_args), args.chunk_s)
        described["task"] = example.target
        batch, sizes = example.global_batch, dict(example.task_args)
        plain_run = PlainRun(
            example.target,
            task_args,
            example.global_batch,
            args.steps,
            WARMUP_STEPS,
            grad_clip=config.train.grad_clip,
            seed=config.train.seed,
        )

        def plain() -> tuple[float, tuple[float, float]]:
            return plain_task_step_s(plain_run, _free_port())

    def in_process() -> tuple[float, tuple[float, float]]:
        return spawned_step_s(worker_rank, WorkerRun(config, WARMUP_STEPS, args.chunk), _free_port(), 2)

    samples: dict[str, list[float]] = {"toolkit_step_s": [], "plain_ddp_step_s": []}
    outside: list[float] = []
    shares: dict[str, list[dict[str, Any]]] = {"toolkit": [], "plain": []}
    with local_ray(worker_niceness=args.worker_niceness):
        for _ in range(args.repeats):
            if args.in_process:  # the Worker's own step: no heartbeats, so nothing is spent outside it
                step_s, cpu = sampled(in_process)
                outside_s = 0.0
            else:
                step_s, outside_s, cpu = toolkit_step_s(config)
            samples["toolkit_step_s"].append(step_s)
            outside.append(outside_s)
            shares["toolkit"].append(cpu)
            step_s, cpu = sampled(plain)
            samples["plain_ddp_step_s"].append(step_s)
            shares["plain"].append(cpu)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["toolkit_step_s"] / med["plain_ddp_step_s"]
    share_medians = {
        side: {k: statistics.median(float(s[k]) for s in runs) for k in ("ranks", "others", "idle")}
        for side, runs in shares.items()
    }
    return {
        "benchmark": "overhead",
        **described,
        "workers": 2,
        # The toolkit side: its Ray run, or (--in-process) its Worker's steps alone (worker_loop.py).
        "toolkit": "in-process" if args.in_process else "ray",
        "global_batch": batch,
        "model": sizes,
        "grad_clip": config.train.grad_clip,
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "chunk_steps": args.chunk,
        "chunk_s": args.chunk_s,
        "worker_niceness": args.worker_niceness,
        "repeats": args.repeats,
        "samples": samples,
        "median": med,
        "ratio": ratio,
        # Of the toolkit's seconds per step, those its ranks spent outside their steps (its median): ~0
        # where ranks train on past a chunk's end (trainer/cluster/stretch.py) instead of waiting for the
        # driver there.
        "toolkit_outside_steps_s": statistics.median(outside),
        # The host's cpu-seconds during each side's steady state: its two ranks', everything else's (for the
        # toolkit Ray's daemons and the driver; for both the sampler and the machine's own), idle. With every
        # core busy, what the toolkit's "others" exceed the plain loop's by can be taken from its ranks (a
        # bound: other work also fits where the cores idle).
        "toolkit_cpu_shares": shares["toolkit"],
        "plain_cpu_shares": shares["plain"],
        "cpu_share_medians": share_medians,
        "goal_ratio_max": 1.02,
        "goal_met": ratio <= 1.02,
        "goal_step_s_min": 0.010,
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
        },
    }


if __name__ == "__main__":
    main()
