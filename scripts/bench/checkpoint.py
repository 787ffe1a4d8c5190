"""Checkpoint cost against what a user would do instead, measured in one run.

Compares, interleaved (A B C … A B C …) because disk speed drifts up to 3x between runs on shared machines:

* **A — this toolkit's async save**, alone: the time the save call blocks (staging copy into reused CPU
  buffers; the parameters' and optimizer state's copies overlap with the next step until its optimizer
  step, as a worker saves), then the background write (DCP files with their digests, one fsync pass,
  atomic rename, ``latest``). ``async_blocking_in_order_s``: the same call with every copy made before it
  returns.
* **B — synchronous ``torch.save``** of the same state dict to one file, fsynced: the usual alternative.
* **C — a raw sequential write** of the same number of bytes, fsynced at the end: what the disk can do for
  a plain writer. **C'** is the same write with the disk started every 32 MB (as the toolkit's writer does),
  the disk's own speed with no serialisation at all; both are reported.
* **A' — the same save through the page cache** (``--page-cache``: ``checkpoint.direct_io=false``;
  by default the toolkit writes with O_DIRECT where the filesystem allows it), interleaved with A: its
  write time, the write's CPU seconds and the training time it loses (``page_cache_write_s``,
  ``page_cache_write_cpu_s``, ``lost_page_cache_s``; ratios ``write_vs_page_cache``,
  ``write_cpu_vs_page_cache``, ``lost_vs_page_cache``).
* The CPU seconds of A's write and of C (``async_write_cpu_s``, ``raw_write_cpu_s``): what a write takes
  from training on a host whose cores all train, less sensitive to other load than wall times.
* **M — one memcpy of the state** into existing buffers: the floor for any save that copies the state.
* **F — the CPU floor of the save's mandatory work** on this host (CPU only, local disk): the XXH3-128
  digest of the state's bytes and their O_DIRECT write from page-aligned memory, in thread CPU seconds
  (``digest_cpu_s``, ``direct_write_cpu_s``; the floor adds the least of each), with no copy and no
  serialisation. Where training keeps every core busy, a save takes at least this much from it:
  ``save_cpu_floor_vs_memcpy``, and with the staging copy ``copy_and_save_cpu_floor_vs_memcpy``, set the
  least ``lost_vs_memcpy`` a save with digests can reach here.
* **B — CPU work beside training, no save**: training steps beside a thread that copies memory (64 MB
  buffers) until it has used as many CPU-seconds as that repeat's write (``burn_cpu_s``, ``lost_to_burn_s``):
  ``lost_per_cpu_s`` = training seconds lost per CPU-second taken from it here, by any thread; times F with
  the copy (``lost_floor_vs_memcpy``), the least ``lost_vs_memcpy`` a save with digests could show here.
* **D — the bare write beside training, no save**: training steps while the state's bytes are written
  with O_DIRECT from page-aligned memory (no copy, digest or serialisation): ``lost_to_direct_write_s``,
  ``lost_to_direct_write_vs_memcpy`` — what the disk write alone costs training here.
* **P — a peer snapshot's copy** of the state (``snapshot_staged_s``: through the staging buffers, as a
  worker takes one; ``snapshot_fresh_s``: into a fresh allocation, as it did before — the first of the run,
  ``snapshot_fresh_first_s``, touches new memory, as a recovery's one snapshot usually does).
* **T / T+S — training steps** (forward, backward, AdamW step on a small batch) without a save, and with
  an async save started before the first of them, run until the save (write, commit, deletion of the old
  checkpoint) is finished. ``lost_s`` = the wall time of the window with the save minus the same number of
  steps at the median step time without: what training loses to a save, blocking included;
  ``lost_in_order_s``: the same with every copy made before the save call returns.
* **W — fixed windows** (``--idle-writer``): ``--window-steps`` steps with a save started at their first
  one, then the save's rest finished with training stopped (not timed), against the same steps without a
  save, in pairs; once with the writer at normal priority, once at idle priority
  (``checkpoint.writer_priority=idle``, Linux), whose write fills the gaps training leaves and takes many
  steps. ``lost_window_s`` / ``lost_window_idle_s`` = the window with the save minus the one without:
  what the save took from training within the window; ``steps_with_idle_save``: steps the idle save took
  (0: it outlasted the window). **T+S idle** — the idle save's whole cost: training steps from the save
  call until the idle save (write, commit, deletion of the old checkpoint) is finished, against the same
  number of steps without a save run right after: ``lost_idle_s``, ``lost_idle_vs_memcpy`` (the issue's
  criterion, with the writer at idle priority), ``steps_until_idle_save_done``.

Prints one JSON object: medians and ratios —
``write_throughput_ratio`` = C's time ÷ A's write time (goal ≥ 0.9),
``lost_vs_memcpy`` = lost time ÷ M (goal ≤ 1.2), ``lost_vs_torch_save`` = lost time ÷ B,
``blocking_ratio`` = A's blocking time ÷ B, and ``host_staging_bytes``: the host memory a worker holds for
staging (one copy of its state, reused by every save and by peer snapshots). With a CUDA device (``--device cuda``: needs a CUDA
build of PyTorch and nothing else) the state lives on the GPU and the blocking and lost times are compared
with the measured device-to-host copy time of the state instead of M.

With ``--dir s3://bucket/prefix`` A, B and C go to object storage: A is the toolkit's save to that URL
(spooled locally, uploaded, manifest last), B ``torch.save`` into memory and one upload of the bytes, C a
raw upload of the same number of bytes to the same server. ``--s3-test-server`` starts an S3-compatible
server on 127.0.0.1 for the run (moto's, from the test extras) and makes the bucket; otherwise the
credentials come from ``--storage-option key=value`` (repeatable) or the AWS environment.

With ``--fsdp N`` the state is sharded over N processes joined by gloo (``fully_shard``, each block a unit),
and the comparison is per rank, interleaved as above:

* **A — the toolkit's sharded save**: each rank stages its own shards (the time it blocks) and writes them
  in the background with no collective; the commit (merged ``.metadata``, manifest, fsync, rename) follows
  once every rank's part is in. ``write`` is the time from the save call to the commit.
* **B — a synchronous ``dcp.save``** of the same sharded state by every rank (DCP's collective save with its
  own file writer, fsynced), the usual FSDP alternative; **B2** — gathering the state whole on every rank and
  ``torch.save`` of it by rank 0, fsynced (what a user without DCP does).
* **C — a raw write** by every rank at once of as many bytes as it holds, fsynced.
* **A' — with ``--page-cache``**, A through the page cache (``checkpoint.direct_io=false``):
  ``write_vs_page_cache`` = A's write time ÷ A''s.

``blocking_ratio`` = the slowest rank's blocking ÷ the slowest rank's B; ``write_throughput_ratio`` = C's
time (slowest rank) ÷ A's write time.

    .venv/bin/python scripts/bench/checkpoint.py [--megabytes 600] [--repeats 3] [--device cpu|cuda] [--idle-writer] [--page-cache]
    .venv/bin/python scripts/bench/checkpoint.py --dir s3://bench/ckpt --s3-test-server --megabytes 200
    .venv/bin/python scripts/bench/checkpoint.py --fsdp 3 --megabytes 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from checkpoint_timings import (  # this script's directory: on the path when the script runs
    aligned_copy,
    build_state,
    cpu_seconds,
    d2h_bandwidth,
    direct_write,
    host_floors,
    run_async,
    run_memcpy,
    run_raw_upload,
    run_raw_write,
    run_save_floor,
    run_snapshot,
    run_steps,
    run_steps_beside,
    run_steps_with_burn,
    run_steps_with_save,
    run_torch_save,
    run_torch_save_upload,
    run_window,
)

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.locations import filesystem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="sequences per training step")
    parser.add_argument("--width", type=int, default=512, help="the model's n_embd (layers fill --megabytes)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence (at most 128)")
    parser.add_argument("--steps", type=int, default=5, help="steps per window without a save")
    parser.add_argument("--threads", type=int, default=0, help="training threads (default: one per core)")
    parser.add_argument(
        "--page-cache",
        action="store_true",
        help="also measure the toolkit's save through the page cache (checkpoint.direct_io=false), interleaved",
    )
    parser.add_argument(
        "--idle-writer",
        action="store_true",
        help="also measure fixed windows with a save at normal and at idle priority (Linux)",
    )
    parser.add_argument("--window-steps", type=int, default=20, help="steps per window of --idle-writer")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dir",
        default=None,
        help="where to write: a directory (default: a temp dir on the working disk) or s3://…",
    )
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--s3-test-server", action="store_true", help="start a local S3 server for the run")
    parser.add_argument("--fsdp", type=int, default=0, help="shard the state over N gloo processes (CPU)")
    args = parser.parse_args()
    if args.fsdp:
        from checkpoint_fsdp import main_fsdp  # the FSDP mode, in a file of its own

        main_fsdp(args)
        return
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
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_before = os.getloadavg()[0]

    device = torch.device(args.device)
    model, optimizer = build_state(args.megabytes, device, args.width)
    state = list(model.state_dict().values()) + [v for s in optimizer.state.values() for v in s.values()]
    nbytes = sum(t.numel() * t.element_size() for t in state)
    flat = torch.ones(nbytes, dtype=torch.uint8, device=device)
    flat_copy = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    run_memcpy(flat, flat_copy)  # touches every page of the destination once
    aligned = aligned_copy(flat_copy) if args.device == "cpu" else None
    tokens = torch.randint(0, 4096, (args.batch, args.seq + 1), device=device)
    remote = bool(options) or bool(args.dir and args.dir.startswith("s3://"))
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=None if remote else args.dir or os.getcwd()))
    url = f"{args.dir.rstrip('/')}/bench-{os.getpid()}" if remote else None
    manager = CheckpointManager(url or work / "ckpt", keep_last=1, storage_options=options)
    checkpointer = AsyncCheckpointer(manager)
    # The same save through the page cache (checkpoint.direct_io=false), its own staging.
    paged = None
    if args.page_cache:
        paged = AsyncCheckpointer(CheckpointManager(url or work / "ckpt-paged", 1, options, direct_io=False))
    # The same save with the writer at idle priority (checkpoint.writer_priority=idle), its own staging.
    idle = None
    if args.idle_writer:
        idle_manager = CheckpointManager(url or work / "ckpt-idle", 1, options, writer_priority="idle")
        idle = AsyncCheckpointer(idle_manager)
    fs, base = filesystem(url, options) if url else (None, "")
    names = [
        "async_blocking_s",
        "async_blocking_in_order_s",
        "async_write_s",
        "torch_save_s",
        "raw_write_s",
        "raw_write_streamed_s",
    ]
    names += [
        "async_write_cpu_s",
        "raw_write_cpu_s",
        "memcpy_s",
        "digest_cpu_s",
        "direct_write_cpu_s",
        "burn_cpu_s",
        "lost_to_burn_s",
        "lost_to_direct_write_s",
        "step_s",
        "steps_with_save_s",
        "steps_with_save",
        "lost_s",
        "lost_in_order_s",
        "lost_window_s",
        "lost_window_idle_s",
        "steps_with_idle_save",
        "lost_idle_s",
        "steps_until_idle_save_done",
        "snapshot_staged_s",
        "snapshot_fresh_s",
        "page_cache_write_s",
        "page_cache_write_cpu_s",
        "lost_page_cache_s",
    ]
    samples: dict[str, list[float]] = {name: [] for name in names}
    try:
        run_async(checkpointer, model, optimizer, 0)  # warm-up: allocates the staging buffers once
        if idle is not None:
            run_async(idle, model, optimizer, 0)
        if paged is not None:
            run_async(paged, model, optimizer, 0)
        run_steps(model, optimizer, tokens, 2)
        for i in range(args.repeats):
            blocking, write, write_cpu = run_async(checkpointer, model, optimizer, 2 * i + 1)
            samples["async_write_cpu_s"].append(write_cpu)
            samples["async_blocking_s"].append(blocking)
            samples["async_write_s"].append(write)
            blocking, _, _ = run_async(checkpointer, model, optimizer, 2 * i + 1, overlap=False)
            samples["async_blocking_in_order_s"].append(blocking)
            if paged is not None:
                _, write, write_cpu = run_async(paged, model, optimizer, 2 * i + 1)
                samples["page_cache_write_s"].append(write)
                samples["page_cache_write_cpu_s"].append(write_cpu)
            if fs is not None:
                samples["torch_save_s"].append(
                    run_torch_save_upload(model, optimizer, fs, f"{base}-torch.pt")
                )
                samples["raw_write_s"].append(run_raw_upload(nbytes, fs, f"{base}-raw.bin"))
            else:
                samples["torch_save_s"].append(run_torch_save(model, optimizer, work))
                cpu = cpu_seconds()
                samples["raw_write_s"].append(run_raw_write(nbytes, work))
                samples["raw_write_cpu_s"].append(cpu_seconds() - cpu)
                samples["raw_write_streamed_s"].append(run_raw_write(nbytes, work, kick=True))
            samples["memcpy_s"].append(run_memcpy(flat, flat_copy))
            if aligned is not None and fs is None:
                digest, direct = run_save_floor(aligned, work)
                samples["digest_cpu_s"].append(digest)
                if direct is not None:
                    samples["direct_write_cpu_s"].append(direct)
            staged, fresh = run_snapshot(checkpointer, model, optimizer)
            samples["snapshot_staged_s"].append(staged)
            samples["snapshot_fresh_s"].append(fresh)
            plain = run_steps(model, optimizer, tokens, args.steps)
            step_s = statistics.median(plain)
            samples["step_s"].append(step_s)
            # The save as a worker makes it, and with its copies in order (not beside the next step); which
            # goes first alternates (the first after the writes above was measured slower).
            for overlap in (True, False) if i % 2 == 0 else (False, True):
                window, steps = run_steps_with_save(
                    checkpointer, model, optimizer, tokens, 2 * i + 2 + (not overlap), overlap=overlap
                )
                samples["lost_s" if overlap else "lost_in_order_s"].append(window - steps * step_s)
                if overlap:
                    samples["steps_with_save_s"].append(window)
                    samples["steps_with_save"].append(steps)
            if aligned is not None:  # B: as much CPU as the save's write took, no save
                window, steps, burnt = run_steps_with_burn(
                    model, optimizer, tokens, samples["async_write_cpu_s"][-1]
                )
                samples["burn_cpu_s"].append(burnt)
                samples["lost_to_burn_s"].append(window - steps * step_s)
                # D: the state's bytes written with O_DIRECT beside training, nothing else (3 times: it
                # lasts a step or two, as long as the step times' own spread).
                for _ in range(3):
                    window, steps = run_steps_beside(
                        model, optimizer, tokens, lambda: direct_write(aligned, work)
                    )
                    samples["lost_to_direct_write_s"].append(window - steps * step_s)
            if paged is not None:
                window, steps = run_steps_with_save(paged, model, optimizer, tokens, 2 * i + 2)
                samples["lost_page_cache_s"].append(window - steps * step_s)
            if idle is not None:
                for name, saver in (("lost_window_s", checkpointer), ("lost_window_idle_s", idle)):
                    bare, _ = run_window(None, model, optimizer, tokens, 0, args.window_steps)
                    window, took = run_window(saver, model, optimizer, tokens, 2 * i + 2, args.window_steps)
                    samples[name].append(window - bare)
                # Steps the idle save took (0: more than the window).
                samples["steps_with_idle_save"].append(took or 0)
                # Its whole cost: every step until it is done, against as many steps without a save.
                window, steps = run_steps_with_save(idle, model, optimizer, tokens, 2 * i + 3)
                bare, _ = run_window(None, model, optimizer, tokens, 0, steps)
                samples["lost_idle_s"].append(window - bare)
                samples["steps_until_idle_save_done"].append(steps)
    finally:
        checkpointer.close()
        for other in (idle, paged):
            if other is not None:
                other.close()
        shutil.rmtree(work, ignore_errors=True)
        if fs is not None:
            fs.rm(base, recursive=True)

    med = {k: statistics.median(v) for k, v in samples.items() if v}
    floor = med["memcpy_s"]
    bandwidth = d2h_bandwidth(nbytes) if args.device == "cuda" else None
    if bandwidth is not None:
        floor = nbytes / bandwidth
    result: dict[str, Any] = {
        "benchmark": "checkpoint",
        "device": args.device,
        "target": "object storage (raw = one upload of the same bytes)" if fs is not None else "local disk",
        "state_bytes": nbytes,
        "host_staging_bytes": checkpointer.staging.nbytes,
        "host_staging_note": "one copy of the state, allocated once, reused by every save and peer snapshot",
        # A peer snapshot's copy: through the staging buffers, against a fresh copy of the state (the first
        # of the run touches new memory; later ones may reuse what the allocator kept of the one before).
        "snapshot_fresh_first_s": samples["snapshot_fresh_s"][0],
        "repeats": args.repeats,
        "batch": [args.batch, args.seq],
        "width": args.width,
        "direct_io": manager.direct_io,
        "samples": samples,
        "median": med,
        "write_throughput_ratio": med["raw_write_s"] / med["async_write_s"],
        "async_write_GBps": nbytes / med["async_write_s"] / 1e9,
        "raw_write_GBps": nbytes / med["raw_write_s"] / 1e9,
        "floor_s": floor,
        "floor": "device-to-host copy of the state" if bandwidth is not None else "one memcpy of the state",
        "lost_vs_memcpy": med["lost_s"] / floor,
        "lost_vs_torch_save": med["lost_s"] / med["torch_save_s"],
        "lost_in_order_vs_memcpy": med["lost_in_order_s"] / floor if "lost_in_order_s" in med else None,
        "lost_window_vs_memcpy": med["lost_window_s"] / floor if "lost_window_s" in med else None,
        "lost_window_idle_vs_memcpy": med["lost_window_idle_s"] / floor if "lost_window_s" in med else None,
        "lost_idle_vs_memcpy": med["lost_idle_s"] / floor if "lost_idle_s" in med else None,
        "blocking_vs_memcpy": med["async_blocking_s"] / floor,
        "blocking_ratio": med["async_blocking_s"] / med["torch_save_s"],
        "blocking_in_order_vs_memcpy": med["async_blocking_in_order_s"] / floor,
        # On a GPU the copy overlaps with training: what is lost must stay under a quarter of the copy.
        "goals": {
            "write_throughput_ratio_min": 0.9,
            "lost_vs_memcpy_max": 0.25 if bandwidth is not None else 1.2,
            "blocking_ratio_max": 0.05,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "training_threads": torch.get_num_threads(),
            # Other processes' load spoils the step times (intra-op threads stall when a core is taken).
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if "raw_write_streamed_s" in med:
        result["raw_write_streamed_GBps"] = nbytes / med["raw_write_streamed_s"] / 1e9
        result["write_throughput_ratio_streamed"] = med["raw_write_streamed_s"] / med["async_write_s"]
    if "page_cache_write_s" in med:  # the same save through the page cache (--page-cache)
        result["write_vs_page_cache"] = med["async_write_s"] / med["page_cache_write_s"]
        result["write_cpu_vs_page_cache"] = med["async_write_cpu_s"] / med["page_cache_write_cpu_s"]
        result["lost_vs_page_cache"] = med["lost_s"] / med["lost_page_cache_s"]
    if bandwidth is not None:
        result["d2h_GBps"] = bandwidth / 1e9
    result.update(host_floors(samples, floor))
    result["goals_met"] = {
        "write_throughput_ratio": result["write_throughput_ratio"] >= 0.9,
        "lost_vs_memcpy": result["lost_vs_memcpy"] <= result["goals"]["lost_vs_memcpy_max"],
        "blocking_ratio": result["blocking_ratio"] <= 0.05,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
