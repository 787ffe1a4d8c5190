"""Typed configuration: dataclasses registered in Hydra's ConfigStore and validated before anything starts.

YAML files under ``conf/`` (installed as the package :data:`CONFIG_MODULE`) only select and override. Groups
whose implementation a user may swap (``model``, ``data``, ``optim``, ``monitoring``) are ``_target_`` nodes:
the built-in choices are typed by the schemas, a user's own class is passed its node's keys as keyword
arguments by ``hydra.utils.instantiate``.

:func:`validate` turns a composed ``DictConfig`` into a :class:`Config` and raises :class:`ConfigError`
naming the key, the value and what is allowed. The schemas live in :mod:`trainer.config.training` (what is
trained) and :mod:`trainer.config.operations` (how the run is operated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from trainer.config.operations import (
    CLUSTER_MODES,
    ClusterConfig,
    FamilyFaults,
    FaultsConfig,
    FaultToleranceConfig,
    ProbesConfig,
    PrometheusConfig,
)
from trainer.config.training import (
    PRECISIONS,
    RESUME_MODES,
    AdamWConfig,
    CheckpointConfig,
    DeviceConfig,
    GPTConfig,
    SGDConfig,
    SyntheticDataConfig,
    TrainConfig,
)
from trainer.errors import ConfigError

__all__ = [
    "CLUSTER_MODES",
    "PRECISIONS",
    "RESUME_MODES",
    "AdamWConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "DeviceConfig",
    "FamilyFaults",
    "FaultToleranceConfig",
    "FaultsConfig",
    "GPTConfig",
    "ProbesConfig",
    "PrometheusConfig",
    "SGDConfig",
    "SyntheticDataConfig",
    "TrainConfig",
    "from_container",
    "register_configs",
    "to_container",
    "validate",
]


@dataclass
class Config:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    #: The user's training code: a ``_target_`` node naming a ``trainer.api.Task`` subclass, its other keys
    #: passed to the constructor. Null: the built-in language model from ``model``, ``data`` and ``optim``.
    task: Any = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    #: A ``_target_`` node building the trainer.metrics.MetricsSink (prometheus, or off: NullSink).
    monitoring: Any = MISSING
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    #: Name of the experiment preset applied (``experiment=<name>``), for journals and metrics.
    name: str = "default"


#: The package holding the YAML configs: the top-level ``conf/`` directory, mapped onto ``trainer.conf`` by
#: pyproject.toml so that a wheel carries it; Hydra reads it as ``pkg://trainer.conf``.
CONFIG_MODULE = "trainer.conf"


def register_configs() -> None:
    """Register the schemas with Hydra. Idempotent; called on import of this module."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="gpt_schema", node=GPTConfig)
    cs.store(group="data", name="synthetic_schema", node=SyntheticDataConfig)
    cs.store(group="optim", name="adamw_schema", node=AdamWConfig)
    cs.store(group="optim", name="sgd_schema", node=SGDConfig)
    cs.store(group="monitoring", name="prometheus_schema", node=PrometheusConfig)


register_configs()


def _plugin_node(group: str, node: Any) -> Any:
    """A ``_target_`` group (model/data/optim): typed schemas were validated already; check the target."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{group}._target_ is missing; allowed: a dotted path to a class or function")
    return node


def validate(cfg: DictConfig | Config) -> Config:
    """The typed, validated form of ``cfg``. Raises :class:`ConfigError` on any bad or missing value."""
    if isinstance(cfg, Config):
        return cfg
    try:
        typed = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(
            f"{key} is missing (value '???'); set it, e.g. python -m trainer {key}=<value>"
        ) from None
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"invalid configuration: {exc}") from None
    if not isinstance(typed, Config):
        raise ConfigError(
            "the configuration does not follow trainer.config.Config (is config_schema in defaults?)"
        )
    for group in ("model", "data", "optim", "monitoring"):
        _plugin_node(group, getattr(typed, group))
    if typed.task is not None:
        _plugin_node("task", typed.task)
    if typed.train.sharded and typed.device.precision == "fp16":
        raise ConfigError(
            "train.parallelism=fsdp with device.precision=fp16 is not supported (its loss scaling over sharded "
            "gradients is not implemented); allowed: fp32 or bf16 with fsdp, or train.parallelism=ddp"
        )
    per_step = typed.cluster.workers * typed.train.grad_accum_steps
    if typed.train.global_batch_size < per_step:
        raise ConfigError(
            f"train.global_batch_size={typed.train.global_batch_size} is smaller than cluster.workers="
            f"{typed.cluster.workers} x train.grad_accum_steps={typed.train.grad_accum_steps}; allowed: at "
            f"least {per_step} (one sample per micro-batch of every rank)"
        )
    for family, size in typed.cluster.family_workers.items():
        if family == typed.device.family:
            raise ConfigError(
                f"cluster.family_workers.{family}={size} names the family the run starts on; allowed: other "
                f"families (the run starts with cluster.workers={typed.cluster.workers})"
            )
        if typed.train.global_batch_size < size * typed.train.grad_accum_steps:
            raise ConfigError(
                f"cluster.family_workers.{family}={size} x train.grad_accum_steps={typed.train.grad_accum_steps} "
                f"is more than train.global_batch_size={typed.train.global_batch_size}; allowed: at most "
                f"{typed.train.global_batch_size // typed.train.grad_accum_steps} workers"
            )
    if typed.cluster.mode == "process" and typed.cluster.workers != 1:
        raise ConfigError(
            f"cluster.workers={typed.cluster.workers} with cluster.mode=process; allowed: 1 (one worker, in this "
            "process), or a Ray group (cluster=ray_local) for more"
        )
    if typed.cluster.mode == "process" and (typed.faults.kill_rank is not None or typed.faults.kill_ranks):
        raise ConfigError(
            "faults.kill_rank / faults.kill_ranks kill a worker's process; with cluster.mode=process the one "
            "worker is the driver's own process; allowed: a Ray group (cluster=ray_local) for this fault"
        )
    for key in ("kill_rank", "hang_rank"):
        rank = getattr(typed.faults, key)
        if rank is not None and rank >= typed.cluster.workers:
            raise ConfigError(f"faults.{key}={rank} is not allowed; allowed: 0..{typed.cluster.workers - 1}")
    outside = [r for r in typed.faults.kill_ranks if not 0 <= r < typed.cluster.workers]
    if outside:
        raise ConfigError(
            f"faults.kill_ranks={list(typed.faults.kill_ranks)} names ranks {outside} the group does not have; "
            f"allowed: ranks in 0..{typed.cluster.workers - 1}"
        )
    return typed


def from_container(container: dict[str, Any]) -> Config:
    """A validated :class:`Config` from :func:`to_container`'s output (e.g. shipped to a Ray actor)."""
    return validate(OmegaConf.merge(OmegaConf.structured(Config), container))  # type: ignore[arg-type]


def to_container(cfg: Config) -> dict[str, Any]:
    """Plain JSON-serialisable form of a validated config (for manifests and journals)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
