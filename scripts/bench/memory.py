"""Peak resident memory per rank: ``train.parallelism=fsdp`` against ``ddp`` for the same model, batch and ranks.

Each configuration runs in its own group of ``--ranks`` processes joined by gloo on this host (fresh
processes, so one run's memory does not carry into the next); every rank builds the toolkit's ``Worker``
(the built-in GPT sized to about ``--megabytes`` of parameters plus AdamW state), trains ``--steps`` steps
and reports its peak resident set (``ru_maxrss``: building the model whole on every rank, before it is
sharded, is part of it), its resident set after training once freed memory is returned to the system
(``malloc_trim``: what the rank holds to go on training), both over its resident set before the model was
built. What a save holds — its capture and a copy of the tensors, which under FSDP are each rank's own
shards (no gather) — is measured separately with ``--with-capture``.

    .venv/bin/python scripts/bench/memory.py [--ranks 2] [--megabytes 400] [--steps 3] [--with-capture]

Prints one JSON object: per mode, the medians over ranks, and FSDP's growth ÷ DDP's for both figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from trainer.testing.configs import make_config
from trainer.testing.s3 import free_port
from trainer.worker import Worker


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rank(
    rank: int, world: int, port: int, overrides: list[str], steps: int, capture: bool, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    baseline = _rss_mib()
    worker = Worker(make_config(*overrides))
    worker.setup()
    worker.attach(rank, world)
    for _ in range(steps):
        worker.train_step()
    trained_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: what the run holds now
    resident = _rss_mib()
    if capture:  # what a save holds: FSDP, each rank's own shards (no gather); DDP, the whole state
        state = worker.capture(gather=False)
        staged = {
            k: (t.to_local() if isinstance(t, DTensor) else t).detach().clone()
            for k, t in state.tensors.items()
        }
        del state, staged
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{rank}.json").write_text(
        json.dumps(
            {
                "baseline_mib": baseline,
                "train_peak_mib": trained_peak,
                "resident_mib": resident,
                "peak_mib": peak,
            }
        )
    )
    dist.destroy_process_group()


def measure(mode: str, ranks: int, megabytes: int, steps: int, capture: bool) -> dict[str, Any]:
    n_embd = 512
    layers = max(1, int(megabytes * 1e6 / 16 / (12 * n_embd * n_embd)))  # fp32 params x (1 + grad + 2 Adam)
    overrides = [
        "device=cpu",
        f"model.n_layer={layers}",
        f"model.n_embd={n_embd}",
        "model.n_head=8",
        "model.seq_len=64",
        f"train.global_batch_size={2 * ranks}",
        f"train.parallelism={mode}",
        "monitoring=off",
    ]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(ranks, free_port(), overrides, steps, capture, out), nprocs=ranks)
        rows = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(ranks)]
    return {
        "layers": layers,
        "train_peak_mib": round(statistics.median(r["train_peak_mib"] for r in rows), 1),
        "train_growth_mib": round(
            statistics.median(r["train_peak_mib"] - r["baseline_mib"] for r in rows), 1
        ),
        "resident_growth_mib": round(
            statistics.median(r["resident_mib"] - r["baseline_mib"] for r in rows), 1
        ),
        "peak_with_capture_mib": round(statistics.median(r["peak_mib"] for r in rows), 1)
        if capture
        else None,
    }


def _ratio(results: dict[str, dict[str, Any]], key: str) -> float:
    return round(results["fsdp"][key] / results["ddp"][key], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--megabytes", type=int, default=400)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--with-capture", action="store_true")
    args = parser.parse_args()
    results = {
        m: measure(m, args.ranks, args.megabytes, args.steps, args.with_capture) for m in ("ddp", "fsdp")
    }
    print(
        json.dumps(
            {
                "benchmark": "memory",
                "host_cpus": os.cpu_count(),
                "ranks": args.ranks,
                "state_megabytes": args.megabytes,
                **results,
                "fsdp_to_ddp_peak": _ratio(results, "train_growth_mib"),
                "fsdp_to_ddp_resident": _ratio(results, "resident_growth_mib"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
