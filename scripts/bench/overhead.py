"""Per-step overhead of the toolkit (Ray actors, heartbeats, journal, Prometheus exporter) against a plain
torch DDP loop on the same model, batch and worker count, measured in the same run.

* **toolkit**: ``trainer.job.run`` with ``cluster=ray_local`` (2 workers, gloo), the Prometheus exporter on,
  checkpoints and probes off; steady-state seconds per step = wall time between two heartbeats of the
  journal ÷ the steps between them (start-up and the first chunks excluded).
* **plain DDP**: 2 processes started with ``torch.multiprocessing``, gloo, ``DistributedDataParallel`` over
  the same GPT, the same synthetic samples, AdamW, gradient clipping; seconds per step over the same number
  of steady-state steps.

Interleaved A B A B …; prints JSON with medians and ``ratio`` = toolkit ÷ plain (goal ≤ 1.02).

    .venv/bin/python scripts/bench/overhead.py [--steps 120] [--repeats 3]
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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.data import GlobalBatchSampler, SyntheticCorpus
from trainer.job import run
from trainer.journal import Journal
from trainer.model import GPT
from trainer.testing.configs import make_config
from trainer.testing.local_ray import local_ray

MODEL = {"vocab_size": 256, "seq_len": 64, "n_layer": 2, "n_head": 4, "n_embd": 128}
BATCH = 16
WARMUP_STEPS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toolkit_step_s(steps: int, chunk: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        config = make_config(
            "cluster=ray_local",
            "device=sim_npu",
            f"train.steps={steps}",
            f"train.global_batch_size={BATCH}",
            "checkpoint.interval_steps=0",
            "probes.preflight=false",
            f"cluster.chunk_steps={chunk}",
            "monitoring.port=0",
            *[f"model.{k}={v}" for k, v in MODEL.items()],
        )
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
            run(config, run_dir=work)
        beats = [e for e in Journal(work / "journal.jsonl").read() if e["event"] == "heartbeat"]
        steady = [b for b in beats if b["first_step"] > WARMUP_STEPS]
        first, last = steady[0], steady[-1]
        return (last["time"] - first["time"]) / (last["step"] - first["step"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    start = 0.0
    for step in range(steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        tokens = data.batch(sampler.indices(step))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
    if rank == 0:
        out.put((time.perf_counter() - start) / (steps - WARMUP_STEPS))
    dist.destroy_process_group()


def plain_step_s(steps: int, world: int = 2) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_plain_worker, args=(r, world, port, steps, out)) for r in range(world)]
    for p in procs:
        p.start()
    value = float(out.get(timeout=600))
    for p in procs:
        p.join(timeout=60)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=10, help="cluster.chunk_steps of the toolkit run")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"toolkit_step_s": [], "plain_ddp_step_s": []}
    with local_ray():
        for _ in range(args.repeats):
            samples["toolkit_step_s"].append(toolkit_step_s(args.steps, args.chunk))
            samples["plain_ddp_step_s"].append(plain_step_s(args.steps))
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["toolkit_step_s"] / med["plain_ddp_step_s"]
    print(
        json.dumps(
            {
                "benchmark": "overhead",
                "workers": 2,
                "global_batch": BATCH,
                "model": MODEL,
                "steps": args.steps,
                "warmup_steps": WARMUP_STEPS,
                "chunk_steps": args.chunk,
                "repeats": args.repeats,
                "samples": samples,
                "median": med,
                "ratio": ratio,
                "goal_ratio_max": 1.02,
                "goal_met": ratio <= 1.02,
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "ray": ray.__version__,
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
