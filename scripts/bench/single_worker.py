"""One worker on one device (``overhead.py --device cpu|cuda``): the toolkit's step against a plain loop of the
same model, optimizer, clipping and data on the same device, in the same process, interleaved.

* **plain loop** (the reference): the built-in GPT, AdamW, gradient clipping, the same synthetic samples read
  ahead by a ``torch.utils.data.DataLoader`` (one worker process, pinned memory on a GPU, non-blocking copies)
  and no host read per step — what a careful user writes. Seconds per step between two device
  synchronisations, after a warm-up. Also reported: the same loop reading its loss every step
  (``loss.item()``), the habit most loops have. ``--fused``: every loop uses AdamW's fused kernel
  (``optim.fused=true``), with which the toolkit's step does not wait for its non-finite check.
* **toolkit in-process**: ``trainer.job.run`` with ``cluster=local`` (Prometheus exporter on, checkpoints,
  probes and the final evaluation off); seconds per step from the journal's heartbeats after the warm-up
  (one every ``--chunk`` steps: ``train.log_interval``).
* **toolkit on Ray**: ``cluster=ray_local`` with one worker and no spare; seconds per step from the journal's
  heartbeats after the warm-up (one per chunk of ``--chunk`` steps). Skipped, and said so, where Ray is not
  installed.

Each measurement runs on a thread of its own that ends with it, so that no side leaves an OpenMP team
behind for the next (in one process, a second team throttles the first: :mod:`trainer.threads`); a plain
loop on such a thread runs as fast as on the main thread of a process of its own.

``--profile FILE`` (after the timed runs): one more run of the plain loop and of the toolkit in-process,
each under ``torch.profiler`` (host and device), and the operators that took most time on each side written
to FILE as two tables — where a ratio above the goal comes from.

A GPU machine needs PyTorch with CUDA, ``hydra-core``, ``omegaconf``, ``prometheus-client``, ``xxhash`` and
``numpy`` (and ``ray`` for the Ray mode); the project itself is imported from the repository.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.config import Config
from trainer.data import GlobalBatchSampler
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.tasks import build_task
from trainer.testing.configs import make_config
from trainer.threads import on_passing_thread

#: Per device: the model preset and global batch, sized so that one step takes ≥ 10 ms.
WORKLOADS = {"cpu": ("gpt_tiny", 32), "cuda": ("gpt_small", 32)}
WARMUP_STEPS = 20


def overrides(device: str, steps: int, ray: bool, chunk: int, fused: bool = False) -> list[str]:
    model, batch = WORKLOADS[device]
    cluster = ["cluster=ray_local", "cluster.workers=1", "cluster.spares=0", f"cluster.chunk_steps={chunk}"]
    return [
        f"device={device}",
        f"model={model}",
        f"train.global_batch_size={batch}",
        f"train.steps={steps}",
        "train.eval_samples=0",
        "checkpoint.interval_steps=0",
        "probes.preflight=false",
        "monitoring.port=0",
        f"train.log_interval={chunk}",
        *(["optim.fused=true"] if fused else []),
        *(cluster if ray else ["cluster=local"]),
    ]


def _timed_run(config: Config) -> tuple[float, Path]:
    work = Path(tempfile.mkdtemp(prefix="bench-single-"))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        start = time.perf_counter()
        code = run(config, run_dir=work)
        wall = time.perf_counter() - start
    if code != ExitCode.FINISHED:
        raise RuntimeError(f"the toolkit's run ended with {code!r} (journal: {work / 'journal.jsonl'})")
    return wall, work


def toolkit_step_s(device: str, steps: int, chunk: int, ray: bool, fused: bool = False) -> float:
    _, work = _timed_run(make_config(*overrides(device, WARMUP_STEPS + steps, ray, chunk, fused)))
    try:
        beats = [e for e in Journal(work / "journal.jsonl").read() if e["event"] == "heartbeat"]
        steady = [b for b in beats if b["first_step"] > WARMUP_STEPS]
        first, last = steady[0], steady[-1]
        return float((last["time"] - first["time"]) / (last["step"] - first["step"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Steps(torch.utils.data.Dataset[torch.Tensor]):
    """Step ``s``'s global batch of the task's corpus, as the toolkit's sampler reads it."""

    def __init__(self, config: Config, corpus: Any, steps: int) -> None:
        self.corpus = corpus
        self.sampler = GlobalBatchSampler(config.train.global_batch_size, 0, 1)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        return self.corpus.batch(self.sampler.indices(step))


def plain_loop_s(device: str, steps: int, read_loss: bool, fused: bool = False) -> float:
    config = make_config(*overrides(device, WARMUP_STEPS + steps, False, 1, fused))
    target = torch.device(device)
    task = build_task(config)  # the built-in GPT's model, AdamW and corpus, as the toolkit builds them
    model = task.build_model(target)
    opt = task.build_optimizer(model)
    loader = torch.utils.data.DataLoader(
        _Steps(config, task.train_dataset(), WARMUP_STEPS + steps),
        batch_size=None,
        num_workers=1,
        pin_memory=device == "cuda",
        prefetch_factor=4,
    )
    sync: Callable[[], Any] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = 0.0
    for step, tokens in enumerate(loader):
        if step == WARMUP_STEPS:
            sync()
            start = time.perf_counter()
        tokens = tokens.to(target, non_blocking=True)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        opt.step()
        if read_loss:
            loss.item()
    sync()
    return (time.perf_counter() - start) / steps


def profile(device: str, steps: int, chunk: int, fused: bool, out: Path) -> None:
    """The plain loop and the toolkit in-process, each run once under ``torch.profiler``: top operators to ``out``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    tables = []
    for name, once in (
        ("plain loop", lambda: plain_loop_s(device, steps, read_loss=False, fused=fused)),
        ("toolkit in-process", lambda: toolkit_step_s(device, steps, chunk, ray=False, fused=fused)),
    ):
        with torch.profiler.profile(activities=activities) as prof:
            step_s = once()
        averages = prof.key_averages()
        tables.append(f"== {name}: {step_s * 1e3:.2f} ms per step ({WARMUP_STEPS} + {steps} steps profiled)")
        tables.append(averages.table(sort_by=sort, row_limit=30, max_name_column_width=60))
        tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    out.write_text("\n".join(tables))


def measure(
    device: str, steps: int, repeats: int, chunk: int, fused: bool = False, worker_niceness: int = 0
) -> dict[str, Any]:
    try:
        import ray  # noqa: F401  (the Ray mode needs it; the rest does not)

        with_ray = True
    except ImportError:
        with_ray = False
    modes: dict[str, Callable[[], float]] = {
        "plain_step_s": lambda: plain_loop_s(device, steps, read_loss=False, fused=fused),
        "plain_read_loss_step_s": lambda: plain_loop_s(device, steps, read_loss=True, fused=fused),
        "toolkit_in_process_step_s": lambda: toolkit_step_s(device, steps, chunk, ray=False, fused=fused),
    }
    if with_ray:
        modes["toolkit_ray_step_s"] = lambda: toolkit_step_s(device, steps, chunk, ray=True, fused=fused)
    samples: dict[str, list[float]] = {k: [] for k in modes}
    context = contextlib.nullcontext()
    if with_ray:
        from trainer.testing.local_ray import local_ray

        context = local_ray(worker_niceness=worker_niceness)  # type: ignore[assignment]
    ray_error = None
    with context:
        for _ in range(repeats):
            for name, measure_once in modes.items():  # interleaved: A B C A B C …
                if name == "toolkit_ray_step_s" and ray_error is not None:
                    continue
                try:
                    samples[name].append(on_passing_thread(measure_once))
                except Exception as exc:  # the Ray mode alone may fail on a host Ray does not run on
                    if name != "toolkit_ray_step_s":
                        raise
                    ray_error = f"{type(exc).__name__}: {exc}"
    if ray_error is not None:
        with_ray = False
        del samples["toolkit_ray_step_s"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    plain = med["plain_step_s"]
    ratios = {
        "toolkit_in_process": med["toolkit_in_process_step_s"] / plain,
        "plain_read_loss": med["plain_read_loss_step_s"] / plain,
    }
    if with_ray:
        ratios["toolkit_ray"] = med["toolkit_ray_step_s"] / plain
    model, batch = WORKLOADS[device]
    goal_ray = 1.05 if device == "cpu" else 1.02
    return {
        "benchmark": "overhead_single_worker",
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": model,
        "optimizer": "AdamW, fused (the toolkit skips a non-finite step on the device)" if fused else "AdamW",
        "global_batch": batch,
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "repeats": repeats,
        "worker_niceness": worker_niceness if with_ray else None,
        "ray": "measured"
        if with_ray
        else (f"failed: {ray_error}" if ray_error else "not installed: skipped"),
        "samples": samples,
        "median": med,
        "ratio": ratios,
        "goal": {"toolkit_in_process": 1.02, "toolkit_ray": goal_ray, "step_s_min": 0.010},
        "goal_met": {
            "toolkit_in_process": ratios["toolkit_in_process"] <= 1.02,
            **({"toolkit_ray": ratios["toolkit_ray"] <= goal_ray} if with_ray else {}),
        },
    }
