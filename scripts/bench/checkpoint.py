"""Checkpoint cost against what a user would do instead, measured in one run.

Compares, interleaved (A B C A B C …) because disk speed drifts between runs on shared machines:

* **A — this toolkit's async save**: the time training is blocked (staging copy into reused CPU buffers),
  then the background write (DCP files, SHA-256 of every file, fsync, atomic rename, ``latest``).
* **B — synchronous ``torch.save``** of the same state dict to one file, fsynced: the usual alternative.
* **C — a raw sequential write** of the same number of bytes, fsynced: what the disk can do.

Prints one JSON object: medians, ``blocking_ratio`` = A's blocking time ÷ B's time (goal ≤ 0.05 for a
state ≥ 500 MB) and ``write_throughput_ratio`` = A's write throughput ÷ C's (goal ≥ 0.8). With a CUDA
device (``--device cuda``) the state lives on the GPU and the blocking time is compared with the measured
device-to-host copy bandwidth.

With ``--dir s3://bucket/prefix`` the three go to object storage: A is the toolkit's save to that URL
(spooled locally, uploaded, manifest last), B ``torch.save`` into memory and one upload of the bytes, C a
raw upload of the same number of bytes to the same server. ``--s3-test-server`` starts an S3-compatible
server on 127.0.0.1 for the run (moto's, from the test extras) and makes the bucket; otherwise the
credentials come from ``--storage-option key=value`` (repeatable) or the AWS environment.

    .venv/bin/python scripts/bench/checkpoint.py [--megabytes 600] [--repeats 3] [--device cpu|cuda]
    .venv/bin/python scripts/bench/checkpoint.py --dir s3://bench/ckpt --s3-test-server --megabytes 200
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointManager, TrainingProgress
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.objects import filesystem
from trainer.checkpoint.state import capture
from trainer.devices import get_adapter
from trainer.model import GPT


def build_state(megabytes: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A GPT whose parameters plus AdamW state weigh about ``megabytes`` (params x3 in fp32)."""
    n_embd = 512
    per_layer = 12 * n_embd * n_embd
    layers = max(1, int(megabytes * 1e6 / 12 / per_layer))
    model = GPT(vocab_size=4096, seq_len=128, n_layer=layers, n_head=8, n_embd=n_embd).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # materialises exp_avg / exp_avg_sq
    return model, optimizer


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_async(
    checkpointer: AsyncCheckpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> tuple[float, float]:
    adapter = get_adapter("cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress = TrainingProgress(step=step, samples_seen=step, world_size=1, seed=0)
    started = time.perf_counter()
    future = checkpointer.save(
        capture(model, optimizer, scaler), adapter.get_rng_state(torch.device("cpu")), adapter, progress, {}
    )
    blocking = time.perf_counter() - started
    future.result()
    return blocking, time.perf_counter() - started - blocking


def run_torch_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> float:
    path = directory / "torch_save.pt"
    started = time.perf_counter()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, path)
    fsync_file(path)
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def run_raw_write(nbytes: int, directory: Path) -> float:
    path = directory / "raw.bin"
    block = os.urandom(8 << 20)
    started = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block[: min(len(block), nbytes - written)])
            written += min(len(block), nbytes - written)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def run_torch_save_upload(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, fs: Any, key: str
) -> float:
    started = time.perf_counter()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    fs.pipe(key, buffer.getvalue())
    elapsed = time.perf_counter() - started
    fs.rm_file(key)
    return elapsed


def run_raw_upload(nbytes: int, fs: Any, key: str) -> float:
    data = os.urandom(8 << 20) * (nbytes // (8 << 20)) + os.urandom(nbytes % (8 << 20))
    started = time.perf_counter()
    fs.pipe(key, data)
    elapsed = time.perf_counter() - started
    fs.rm_file(key)
    return elapsed


def d2h_bandwidth(nbytes: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty(src.shape, dtype=torch.float32, pin_memory=True)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dir",
        default=None,
        help="where to write: a directory (default: a temp dir on the working disk) or s3://…",
    )
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--s3-test-server", action="store_true", help="start a local S3 server for the run")
    args = parser.parse_args()
    if args.dir and args.dir.startswith("s3://"):
        with contextlib.ExitStack() as stack:
            options = dict(o.split("=", 1) for o in args.storage_option)
            if args.s3_test_server:
                from trainer.testing import s3

                endpoint = stack.enter_context(s3.s3_server())
                s3.client(endpoint).create_bucket(Bucket=args.dir[5:].split("/", 1)[0])
                options = {**s3.storage_options(endpoint), **options}
            main_on(args, options)
    else:
        main_on(args, {})


def main_on(args: argparse.Namespace, options: dict[str, str]) -> None:
    # What a single-process job uses (Worker.setup: the host's cores divided by the workers on it).
    torch.set_num_threads(os.cpu_count() or 1)

    device = torch.device(args.device)
    model, optimizer = build_state(args.megabytes, device)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    remote = bool(options) or bool(args.dir and args.dir.startswith("s3://"))
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=None if remote else args.dir or os.getcwd()))
    url = f"{args.dir.rstrip('/')}/bench-{os.getpid()}" if remote else None
    manager = CheckpointManager(url or work / "ckpt", keep_last=1, storage_options=options)
    checkpointer = AsyncCheckpointer(manager)
    fs, base = filesystem(url, options) if url else (None, "")
    samples: dict[str, list[float]] = {
        "async_blocking_s": [],
        "async_write_s": [],
        "torch_save_s": [],
        "raw_write_s": [],
    }
    try:
        run_async(checkpointer, model, optimizer, 0)  # warm-up: allocates the staging buffers once
        for i in range(args.repeats):
            blocking, write = run_async(checkpointer, model, optimizer, i + 1)
            samples["async_blocking_s"].append(blocking)
            samples["async_write_s"].append(write)
            if fs is not None:
                samples["torch_save_s"].append(
                    run_torch_save_upload(model, optimizer, fs, f"{base}-torch.pt")
                )
                samples["raw_write_s"].append(run_raw_upload(nbytes, fs, f"{base}-raw.bin"))
            else:
                samples["torch_save_s"].append(run_torch_save(model, optimizer, work))
                samples["raw_write_s"].append(run_raw_write(nbytes, work))
    finally:
        checkpointer.close()
        shutil.rmtree(work, ignore_errors=True)
        if fs is not None:
            fs.rm(base, recursive=True)

    med = {k: statistics.median(v) for k, v in samples.items()}
    result: dict[str, Any] = {
        "benchmark": "checkpoint",
        "device": args.device,
        "target": "object storage (raw = one upload of the same bytes)" if fs is not None else "local disk",
        "state_bytes": nbytes,
        "repeats": args.repeats,
        "samples": samples,
        "median": med,
        "blocking_ratio": med["async_blocking_s"] / med["torch_save_s"],
        "async_write_GBps": nbytes / med["async_write_s"] / 1e9,
        "raw_write_GBps": nbytes / med["raw_write_s"] / 1e9,
        "write_throughput_ratio": med["raw_write_s"] / med["async_write_s"],
        "goals": {"blocking_ratio_max": 0.05, "write_throughput_ratio_min": 0.8},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    bandwidth = d2h_bandwidth(nbytes) if args.device == "cuda" else None
    if bandwidth is not None:
        result["d2h_GBps"] = bandwidth / 1e9
        result["blocking_vs_d2h_copy"] = med["async_blocking_s"] / (nbytes / bandwidth)
    result["goals_met"] = {
        "blocking_ratio": result["blocking_ratio"] <= 0.05,
        "write_throughput_ratio": result["write_throughput_ratio"] >= 0.8,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
