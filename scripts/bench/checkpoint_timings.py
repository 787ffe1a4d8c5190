"""The timed pieces of ``checkpoint.py`` (one worker's state on one device): the state, the toolkit's
async save, training steps with and without a save, and the alternatives it is compared with — a memcpy,
``torch.save``, a raw write or upload, the device-to-host copy."""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from trainer.checkpoint import TrainingProgress
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.dcp_writer import BLOCK, PIECE
from trainer.checkpoint.state import capture
from trainer.checkpoint.store import fsync_path
from trainer.devices import get_adapter
from trainer.model import GPT


def build_state(
    megabytes: int, device: torch.device, n_embd: int = 512
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A GPT ``n_embd`` wide whose parameters plus AdamW state weigh about ``megabytes`` (params x3 in fp32)."""
    per_layer = 12 * n_embd * n_embd
    layers = max(1, int(megabytes * 1e6 / 12 / per_layer))
    model = GPT(vocab_size=4096, seq_len=128, n_layer=layers, n_head=8, n_embd=n_embd).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # materialises exp_avg / exp_avg_sq
    return model, optimizer


def save_async(
    checkpointer: AsyncCheckpointer,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    overlap: bool = True,
) -> Any:
    device = next(model.parameters()).device
    adapter = get_adapter(device.type)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress = TrainingProgress(step=step, samples_seen=step, world_size=1, seed=0)
    state = capture(model, optimizer, scaler)
    # As a worker saves: the copies of the parameters and optimizer state overlap with the next steps
    # until the optimizer's next step (CUDA: a side stream; CPU: a copy thread).
    overlapped = optimizer if overlap else None
    return checkpointer.save(state, adapter.get_rng_state(device), adapter, progress, {}, overlap=overlapped)


def run_snapshot(
    checkpointer: AsyncCheckpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[float, float]:
    """A peer snapshot's copy of the state, as a worker takes it (``WorkerState.snapshot``): seconds through
    the checkpointer's staging buffers (what the toolkit does), then seconds into a fresh allocation of the
    same tensors (what it did before, and what the first touch of new memory costs when the allocator
    has none freed to reuse)."""
    tensors = capture(model, optimizer, torch.amp.GradScaler("cpu", enabled=False)).tensors
    started = time.perf_counter()
    checkpointer.stage(tensors)
    staged = time.perf_counter() - started
    started = time.perf_counter()
    fresh = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}
    synchronize(next(iter(tensors.values())).device)
    copied = time.perf_counter() - started
    del fresh
    return staged, copied


def cpu_seconds() -> float:
    """CPU time of this process so far, all threads (the writer's while the main thread waits)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_async(
    checkpointer: AsyncCheckpointer,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    overlap: bool = True,
) -> tuple[float, float, float]:
    """(blocking s, background write s until committed, CPU s of the write)."""
    started = time.perf_counter()
    future = save_async(checkpointer, model, optimizer, step, overlap)
    blocking = time.perf_counter() - started
    cpu = cpu_seconds()
    future.result()
    write = time.perf_counter() - started - blocking
    cpu = cpu_seconds() - cpu
    checkpointer.wait()  # the old checkpoint's deletion, after the commit: not timed, not left running
    return blocking, write, cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    synchronize(tokens.device)


def run_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, count: int
) -> list[float]:
    """Seconds of each of ``count`` training steps without a save."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        train_step(model, optimizer, tokens)
        times.append(time.perf_counter() - started)
    return times


def run_steps_with_save(
    checkpointer: AsyncCheckpointer,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    step: int,
    overlap: bool = True,
) -> tuple[float, int]:
    """An async save, then training steps until everything the save does in the background is done:
    (wall seconds from the save call to the end of the last step, number of steps). ``overlap=False``: the
    copies in order with training (a GPU's next step waits for them)."""
    started = time.perf_counter()
    save_async(checkpointer, model, optimizer, step, overlap)
    steps = train_while(model, optimizer, tokens, lambda: checkpointer.busy)
    elapsed = time.perf_counter() - started
    checkpointer.wait()
    return elapsed, steps


def train_while(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, busy: Callable[[], bool]
) -> int:
    """Training steps, at least one, until ``busy()`` is false after one; returns how many."""
    steps = 0
    while steps == 0 or busy():
        train_step(model, optimizer, tokens)
        steps += 1
    return steps


def run_steps_with_burn(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, cpu_s: float
) -> tuple[float, int, float]:
    """Training steps beside a thread that copies memory (64 MB at a time, more than the caches hold, the
    GIL released: as the save's copy and digest stream through memory) until it has used ``cpu_s``
    CPU-seconds: (wall seconds from its start to the end of the last step, steps, CPU-seconds it used).
    What such CPU work beside training costs it here, whatever does it."""
    source, target = bytearray(64 << 20), bytearray(64 << 20)
    size = len(source)
    source_at = ctypes.addressof((ctypes.c_char * size).from_buffer(source))
    target_at = ctypes.addressof((ctypes.c_char * size).from_buffer(target))
    used = [0.0]

    def burn() -> None:
        started = time.thread_time()
        while time.thread_time() - started < cpu_s:
            ctypes.memmove(target_at, source_at, size)
        used[0] = time.thread_time() - started

    elapsed, steps = run_steps_beside(model, optimizer, tokens, burn)
    return elapsed, steps, used[0]


def run_window(
    checkpointer: AsyncCheckpointer | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    step: int,
    count: int,
) -> tuple[float, int | None]:
    """(Wall seconds of ``count`` training steps, the steps the save took or None if it outlasted them),
    with a save started before the first step when ``checkpointer`` is given; the save's rest is then
    finished with training stopped, outside the timing."""
    started, done_after = time.perf_counter(), None
    if checkpointer is not None:
        save_async(checkpointer, model, optimizer, step)
    for k in range(count):
        train_step(model, optimizer, tokens)
        if checkpointer is not None and done_after is None and not checkpointer.busy:
            done_after = k + 1
    elapsed = time.perf_counter() - started
    if checkpointer is not None:
        checkpointer.wait()
    return elapsed, done_after


def run_memcpy(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Seconds of one memcpy of the state's bytes between two existing flat buffers: the floor of any
    save that copies the state once."""
    started = time.perf_counter()
    dst.copy_(src, non_blocking=src.device.type != "cpu")
    synchronize(src.device)
    return time.perf_counter() - started


def run_torch_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> float:
    path = directory / "torch_save.pt"
    started = time.perf_counter()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, path)
    fsync_path(path)
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def run_raw_write(nbytes: int, directory: Path, kick: bool = False) -> float:
    """A plain sequential write of ``nbytes``, fsynced; with ``kick`` the disk is started every 32 MB
    (``posix_fadvise(DONTNEED)``, as the toolkit's writer does) instead of only at the fsync."""
    path = directory / "raw.bin"
    block = os.urandom(8 << 20)
    started = time.perf_counter()
    with open(path, "wb") as f:
        written = kicked = 0
        while written < nbytes:
            f.write(block[: min(len(block), nbytes - written)])
            written += min(len(block), nbytes - written)
            if kick and written - kicked >= 32 << 20:
                f.flush()
                os.posix_fadvise(f.fileno(), kicked, written - kicked, os.POSIX_FADV_DONTNEED)
                kicked = written
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def aligned_copy(flat: torch.Tensor) -> mmap.mmap:
    """The bytes of the CPU tensor ``flat`` in page-aligned memory (what O_DIRECT writes from), padded to
    whole pages."""
    buffer = mmap.mmap(-1, -(-flat.numel() // BLOCK) * BLOCK)
    np.frombuffer(buffer, dtype=np.uint8)[: flat.numel()] = flat.numpy()
    return buffer


def run_save_floor(buffer: mmap.mmap, directory: Path) -> tuple[float, float | None]:
    """CPU seconds of what any save with digests must do to the state's bytes on this host, with no copy
    and no serialisation: (the XXH3-128 digest of them, their O_DIRECT write in the writer's pieces, or
    None where the filesystem refuses O_DIRECT). Thread CPU time, system time included."""
    with memoryview(buffer) as view:
        started = time.thread_time()
        xxhash.xxh3_128(view).digest()
        digest = time.thread_time() - started
    return digest, direct_write(buffer, directory)


def direct_write(buffer: mmap.mmap, directory: Path) -> float | None:
    """Write ``buffer`` (page-aligned) to a new file with O_DIRECT in the writer's pieces, fsynced, and
    delete it: the CPU seconds of this thread, or None where the filesystem refuses O_DIRECT."""
    path = directory / "direct.bin"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except (AttributeError, OSError):
        return None
    try:
        started = time.thread_time()
        with memoryview(buffer) as view:
            for offset in range(0, len(view), PIECE):
                with view[offset : offset + PIECE] as piece:
                    os.pwrite(fd, piece, offset)
        os.fsync(fd)
        return time.thread_time() - started
    finally:
        os.close(fd)
        path.unlink()


def run_steps_beside(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, work: Any
) -> tuple[float, int]:
    """Training steps while ``work()`` runs on a thread of its own, until it returns: (wall seconds from
    its start to the end of the last step, steps)."""
    thread = threading.Thread(target=work, name="beside-training")
    started = time.perf_counter()
    thread.start()
    steps = train_while(model, optimizer, tokens, thread.is_alive)
    elapsed = time.perf_counter() - started
    thread.join()
    return elapsed, steps


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


def host_floors(samples: dict[str, list[float]], memcpy_s: float) -> dict[str, float]:
    """The figures of F, B and D (see ``checkpoint.py``) that were measured, against ``memcpy_s``."""
    out: dict[str, float] = {}
    if samples["direct_write_cpu_s"]:  # F: the least measured of each (other load only adds)
        out["save_cpu_floor_s"] = min(samples["digest_cpu_s"]) + min(samples["direct_write_cpu_s"])
        out["save_cpu_floor_vs_memcpy"] = out["save_cpu_floor_s"] / memcpy_s
        out["copy_and_save_cpu_floor_vs_memcpy"] = 1 + out["save_cpu_floor_vs_memcpy"]
    if samples["lost_to_direct_write_s"]:  # D
        out["lost_to_direct_write_vs_memcpy"] = (
            statistics.median(samples["lost_to_direct_write_s"]) / memcpy_s
        )
    if samples["burn_cpu_s"]:  # B
        pairs = zip(samples["lost_to_burn_s"], samples["burn_cpu_s"], strict=True)
        out["lost_per_cpu_s"] = statistics.median(lost / cpu for lost, cpu in pairs)
        if "copy_and_save_cpu_floor_vs_memcpy" in out:
            out["lost_floor_vs_memcpy"] = out["lost_per_cpu_s"] * out["copy_and_save_cpu_floor_vs_memcpy"]
    return out
