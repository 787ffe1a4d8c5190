"""``run(cfg)``: the whole job, callable from Hydra's entry point or directly from tests.

Single-process for now: one worker in this process trains, checkpoints every ``checkpoint.interval_steps``
and at the end, and resumes from the newest good checkpoint when the run directory already has one.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.config import Config, validate
from trainer.errors import ConfigError, ExitCode
from trainer.goodput import Goodput
from trainer.journal import Journal
from trainer.metrics import MetricsSink
from trainer.summary import format_summary, summarize
from trainer.worker import Worker

log = logging.getLogger("trainer")


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """The run's home: the argument, else Hydra's output directory, else the working directory."""
    if run_dir is not None:
        return Path(run_dir).resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    return Path.cwd().resolve()


def checkpoint_dir(config: Config, run_dir: Path) -> Path:
    path = Path(config.checkpoint.dir)
    return path if path.is_absolute() else run_dir / path


def run(cfg: DictConfig | Config, run_dir: str | Path | None = None) -> ExitCode:
    """Train to ``train.steps`` and return how the run ended. Raises ConfigError on a bad configuration."""
    config = validate(cfg)
    home = resolve_run_dir(run_dir)
    home.mkdir(parents=True, exist_ok=True)
    journal = Journal(home / "journal.jsonl")
    manager = CheckpointManager(checkpoint_dir(config, home), keep_last=config.checkpoint.keep_last)
    if config.checkpoint.resume == "none" and manager.has_checkpoints():
        raise ConfigError(
            f"checkpoint.resume='none' but {manager.root} already holds checkpoints, which would be mixed with "
            "a new run's; allowed: checkpoint.resume=latest, or another hydra.run.dir / checkpoint.dir"
        )

    if config.cluster.mode == "ray":
        return _run_on_ray(config, home, journal, manager)

    worker = Worker(config)
    worker.setup()
    journal.record(
        "run_started", run_dir=str(home), family=worker.adapter.name, world_size=1, name=config.name
    )
    print(f"run directory: {home}")
    print(f"device family: {worker.adapter.name} ({worker.device}), checkpoints: {manager.root}")

    restored = worker.restore(manager) if config.checkpoint.resume == "latest" else None
    if restored is not None:
        for path, why in restored.skipped:
            journal.record("checkpoint_skipped", path=str(path), reason=why)
            print(f"warning: skipped damaged checkpoint {path}: {why}")
        journal.record(
            "resumed",
            path=str(restored.path),
            step=worker.step,
            from_family=restored.manifest.family,
            family=worker.adapter.name,
            rng_restored=restored.rng_restored,
        )
        rng = "restored" if restored.rng_restored else "re-derived from (seed, step, rank)"
        print(
            f"resumed from {restored.path} at step {worker.step} (saved on {restored.manifest.family}; RNG {rng})"
        )

    steps, interval = config.train.steps, config.checkpoint.interval_steps
    last_saved = worker.step if restored is not None else -1
    checkpointer = AsyncCheckpointer(manager)
    started = time.perf_counter()
    try:
        while worker.step < steps:
            result = worker.train_step()
            if result.step % config.train.log_interval == 0 or result.step == steps:
                rate = result.samples / result.step_time_s if result.step_time_s > 0 else math.inf
                print(f"step {result.step}/{steps}  loss {result.loss:.4f}  {rate:.0f} samples/s")
            if interval and result.step % interval == 0 and result.step < steps:
                _checkpoint(worker, manager, checkpointer, journal, config.checkpoint.async_save)
                last_saved = result.step

        eval_loss = worker.evaluate()
        if last_saved != worker.step:
            _checkpoint(worker, manager, checkpointer, journal, False, {"eval_loss": eval_loss})
    finally:
        checkpointer.close()
    elapsed = time.perf_counter() - started
    journal.record(
        "run_finished", step=worker.step, loss=worker.last_loss, eval_loss=eval_loss, train_seconds=elapsed
    )
    print(f"finished at step {worker.step}: loss {worker.last_loss:.4f}, held-out loss {eval_loss:.4f}")
    print(f"the run lives in {home} (journal.jsonl, {manager.root.name}/)")
    log.debug("run finished in %.1f s", elapsed)
    return ExitCode.FINISHED


def _checkpoint(
    worker: Worker,
    manager: CheckpointManager,
    checkpointer: AsyncCheckpointer,
    journal: Journal,
    background: bool,
    metrics: dict[str, float] | None = None,
) -> None:
    """Save now or in the background; the journal records the commit when it happens."""
    step, loss = worker.step, worker.last_loss

    def committed(path: Path, blocking_s: float) -> None:
        journal.record("checkpoint_saved", step=step, path=str(path), loss=loss, blocking_s=blocking_s)

    if background:
        future = worker.save_async(checkpointer, metrics)
        blocking = checkpointer.last_blocking_s

        def on_done(f: Future[Path]) -> None:
            if f.exception() is None:
                committed(f.result(), blocking)
            else:  # surfaces again, as an exception, at the next save or at close()
                journal.record("checkpoint_failed", step=step, error=str(f.exception()))

        future.add_done_callback(on_done)
        return
    checkpointer.wait()
    started = time.perf_counter()
    committed(worker.save(manager, metrics), time.perf_counter() - started)


def make_sink(config: Config) -> MetricsSink:
    """The metrics sink named by the ``monitoring`` group (the Prometheus exporter, or a do-nothing one)."""
    node = config.monitoring
    sink = instantiate(node if isinstance(node, dict) else OmegaConf.structured(node))
    if not isinstance(sink, MetricsSink):
        raise ConfigError(
            f"monitoring._target_ builds a {type(sink).__name__}; allowed: a trainer.metrics.MetricsSink"
        )
    return sink


def _run_on_ray(config: Config, home: Path, journal: Journal, manager: CheckpointManager) -> ExitCode:
    """The worker-group path: a controller on this process drives Ray actors."""
    import ray

    from trainer.cluster.controller import Controller

    started_here = not ray.is_initialized()
    if started_here:
        if config.cluster.address is None:
            ray.init(
                num_cpus=config.cluster.local_num_cpus or None,
                resources=dict(config.cluster.local_resources),
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            ray.init(address=config.cluster.address, log_to_driver=False)
    driver_host = "127.0.0.1" if config.cluster.address is None else ray.util.get_node_ip_address()
    goodput = Goodput()
    goodput.resume_from(journal.read())  # a re-launched driver continues the previous account
    journal.record(
        "run_started",
        run_dir=str(home),
        family=config.device.family,
        world_size=config.cluster.workers,
        name=config.name,
        mode="ray",
    )
    print(f"run directory: {home}")
    print(
        f"device family: {config.device.family} x{config.cluster.workers} on Ray, checkpoints: {manager.root}"
    )
    sink = make_sink(config)
    try:
        code = Controller(config, home, manager.root, journal, driver_host, sink, goodput).run()
    finally:
        sink.close()
        if started_here:
            ray.shutdown()
    print("\n== summary\n" + format_summary(summarize(journal.read())))
    print(f"the run lives in {home} (journal.jsonl, {manager.root.name}/)")
    return code
