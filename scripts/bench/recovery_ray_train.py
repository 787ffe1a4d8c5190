"""The Ray Train v2 side of ``recovery.py``: the same job as a ``TorchTrainer`` loop (the toolkit's model,
data, optimizer and step, Ray Train's DDP and checkpoints), rank 1 SIGKILLing itself once, and the figures
read from the steps rank 0 logged. Needs ``ray[train]`` (``.venv/bin/pip install -e ".[bench]"``)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kill_probe import take_kills, the_kill  # this script's directory: on the path when the script runs

if TYPE_CHECKING:
    from trainer.config import Config


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


def run_ray_train(config: Config, base: Path, kill_log: Path, cpu_per_worker: float) -> dict[str, Any]:
    """One run of the job on Ray Train, rank 1 killed once; its recovery figures."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.config import to_container

    # The loop goes to Ray Train's workers by value, as a script's own functions do: they cannot import
    # this file (it is not on their path).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    take_kills(kill_log)
    out = Path(tempfile.mkdtemp(prefix="raytrain-", dir=base))
    kill_at = config.faults.kill_at_step
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"job": to_container(config), "kill_at": kill_at, "out_dir": str(out)},
        scaling_config=ScalingConfig(
            num_workers=config.cluster.workers,
            use_gpu=False,
            resources_per_worker={"CPU": cpu_per_worker},
        ),
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
