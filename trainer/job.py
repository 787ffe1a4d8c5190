"""``run(cfg)``: the whole job, callable from Hydra's entry point or directly from tests.

Validates the configuration, takes the run's lease, and has the run's controller
(:mod:`trainer.cluster.controller`) drive it on a Ray worker group or on a group of one in this process
(:mod:`trainer.cluster.one_process`): one lifecycle (:mod:`trainer.lifecycle`), ending with the run's summary
read back from its journal.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import CheckpointManager, initial
from trainer.checkpoint.lease import Lease
from trainer.checkpoint.locations import local_path, scheme
from trainer.checkpoint.objects import ObjectStore
from trainer.checkpoint.store import CheckpointStore
from trainer.config import Config, validate
from trainer.devices import get_adapter
from trainer.errors import ClusterUnreachableError, ConfigError, ExitCode
from trainer.faults import corrupt_newest_checkpoint
from trainer.goodput import Goodput
from trainer.journal import Journal
from trainer.lifecycle import print_summary, record_started
from trainer.metrics import MetricsSink
from trainer.preemption import Preemption
from trainer.tasks import check_task
from trainer.threads import on_passing_thread

log = logging.getLogger("trainer")


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """The run's home: the argument, else Hydra's output directory, else the working directory."""
    if run_dir is not None:
        return Path(run_dir).resolve()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    return Path.cwd().resolve()


def checkpoint_dir(config: Config, run_dir: Path) -> Path | str:
    """``checkpoint.dir``: a URL as it is (object storage), a relative path inside the run directory."""
    if scheme(config.checkpoint.dir) is not None:
        return config.checkpoint.dir
    path = Path(local_path(config.checkpoint.dir))
    return path if path.is_absolute() else run_dir / path


def run(cfg: DictConfig | Config, run_dir: str | Path | None = None) -> ExitCode:
    """Train to ``train.steps`` and return how the run ended. Raises ConfigError on a bad configuration."""
    config = validate(cfg)
    if config.train.init_weights:
        config.train.init_weights = initial.resolve(config.train.init_weights)
    # The user's code is tried before anything starts or is written — on a thread that ends, so that the
    # torch work of the try leaves no OpenMP team behind in this process (trainer.threads).
    on_passing_thread(check_task, config)
    home = resolve_run_dir(run_dir)
    home.mkdir(parents=True, exist_ok=True)
    journal = Journal(home / "journal.jsonl")
    manager = CheckpointManager(
        checkpoint_dir(config, home),
        config.checkpoint.keep_last,
        config.checkpoint.storage_options,
        writer_priority=config.checkpoint.writer_priority,
        direct_io=config.checkpoint.direct_io,
    )
    if isinstance(manager.store, ObjectStore):
        manager.store.check()  # a missing bucket, bad credentials, an unreachable endpoint: refused now
    stale_s = config.checkpoint.lease_stale_s
    lease = Lease(
        manager.store.lease_slot(), stale_after_s=stale_s, renew_s=stale_s / 6
    ).acquire()  # or LeaseHeldError
    try:
        return _run_leased(config, home, journal, manager, lease)
    finally:
        lease.release()


def _run_leased(
    config: Config, home: Path, journal: Journal, manager: CheckpointManager, lease: Lease
) -> ExitCode:
    """The run, by the one driver that holds its lease."""
    manager.store.fence = lease.fence
    if isinstance(manager.store, ObjectStore):
        manager.store.claim(lease.fence)  # before restoring: no commit of an earlier holder lands after this
    if lease.taken_from is not None:
        journal.record("lease_taken_over", generation=lease.generation, previous=lease.taken_from)
        print(f"took over the run's lease from a driver that stopped renewing it: {lease.taken_from}")
    if config.checkpoint.resume == "none" and manager.has_checkpoints():
        raise ConfigError(
            f"checkpoint.resume='none' but {manager.root} already holds checkpoints, which would be mixed with "
            "a new run's; allowed: checkpoint.resume=latest, or another hydra.run.dir / checkpoint.dir"
        )

    if config.faults.corrupt_latest_checkpoint:
        if not isinstance(manager.store, CheckpointStore):
            raise ConfigError(
                f"faults.corrupt_latest_checkpoint damages files on disk; checkpoint.dir={manager.root} is "
                "object storage; allowed: a local checkpoint.dir for this fault"
            )
        damaged = corrupt_newest_checkpoint(manager.store.root)
        journal.record("fault_injected", fault="corrupt_latest_checkpoint", path=str(damaged))
    if config.cluster.mode == "ray":
        return _run_on_ray(config, home, journal, manager, lease)
    # A group of one: its member is in this process, and Ray is never imported.
    return _drive(config, home, journal, manager, lease, "127.0.0.1")


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when a ``host:port`` Ray address does not answer (``ray.init`` would
    otherwise retry for minutes). ``auto`` is left to Ray, which fails fast when no local cluster runs."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster.address={address!r}; allowed: null, auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnreachableError(
            f"the Ray cluster at cluster.address={address!r} is unreachable ({exc}) within "
            f"cluster.connect_timeout_s={timeout_s}; start it (ray start --head) or fix the address"
        ) from None


def _check_capacity(config: Config) -> None:
    """Refuse a world size the cluster can never hold, before anything is launched."""
    from trainer.cluster.group import bundle_for, capacity

    adapter = get_adapter(config.device.family)
    most = capacity(adapter, config.cluster.cpus_per_worker)
    if adapter.is_available() and 0 < most < config.cluster.workers:
        bundle = bundle_for(adapter, config.cluster.cpus_per_worker)
        raise ConfigError(
            f"cluster.workers={config.cluster.workers} does not fit the Ray cluster: each worker needs {bundle}, "
            f"the cluster holds {most}; allowed: 1..{most} (or lower cluster.cpus_per_worker)"
        )


def make_sink(config: Config) -> MetricsSink:
    """The metrics sink named by the ``monitoring`` group (the Prometheus exporter, or a do-nothing one)."""
    node = config.monitoring
    try:
        sink = instantiate(node if isinstance(node, dict) else OmegaConf.structured(node))
    except InstantiationException as exc:  # Hydra wraps the sink's own errors
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise
    if not isinstance(sink, MetricsSink):
        raise ConfigError(
            f"monitoring._target_ builds a {type(sink).__name__}; allowed: a trainer.metrics.MetricsSink"
        )
    return sink


def _run_on_ray(
    config: Config, home: Path, journal: Journal, manager: CheckpointManager, lease: Lease
) -> ExitCode:
    """The worker-group path: a controller on this process drives Ray actors."""
    import ray

    from trainer.cluster.local_ray import start_local_ray

    started_here = not ray.is_initialized()
    if started_here:
        if config.cluster.address is None:  # out of this process group: a SIGTERM to it reaches the driver
            start_local_ray(
                config.cluster.local_num_cpus or None,
                dict(config.cluster.local_resources),
                config.cluster.local_worker_niceness,
            )
        else:
            _check_reachable(config.cluster.address, config.cluster.connect_timeout_s)
            ray.init(address=config.cluster.address, log_to_driver=False)
    try:
        _check_capacity(config)
        driver_host = "127.0.0.1" if config.cluster.address is None else ray.util.get_node_ip_address()
        return _drive(config, home, journal, manager, lease, driver_host)
    finally:
        if started_here:
            ray.shutdown()


def _drive(
    config: Config,
    home: Path,
    journal: Journal,
    manager: CheckpointManager,
    lease: Lease,
    driver_host: str,
) -> ExitCode:
    """The run's controller (:mod:`trainer.cluster.controller`) drives its group — a Ray worker group, or a
    group of one in this process — to the end; then the summary, read back from the journal."""
    from trainer.cluster.controller import Controller

    goodput = Goodput()
    goodput.resume_from(journal.read())  # a re-launched driver continues the previous account
    family, workers = get_adapter(config.device.family).name, config.cluster.workers  # as the controller's
    where = f"{family} x{workers} on Ray" if config.cluster.mode == "ray" else f"{family} in this process"
    record_started(journal, home, family, workers, config.name, config.cluster.mode, where, manager.root)
    sink = make_sink(config)
    try:
        # Installed after ray.init, which puts its own SIGTERM handler on the driver.
        with Preemption(config.checkpoint.preempt_grace_s).installed() as preemption:
            controller = Controller(
                config, home, manager.root, journal, driver_host, sink, goodput, preemption, lease
            )
            code = controller.run()
    finally:
        sink.close()
    print_summary(journal, home, manager.root)
    return code
