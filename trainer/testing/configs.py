"""Compose the job's Hydra configuration outside ``@hydra.main`` (tests, notebooks, benchmarks)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from trainer.config import CONFIG_MODULE, Config, validate

#: The smallest single-process CPU job: a one-layer GPT, batches of 4, no metrics endpoint. Tests add the rest.
TINY_CPU = (
    "device=cpu",
    "model.n_layer=1",
    "model.n_embd=16",
    "model.seq_len=8",
    "train.global_batch_size=4",
    "monitoring=off",
)

#: :data:`TINY_CPU` with two blocks: the smallest model whose blocks spawned gloo ranks shard (FSDP) or bucket
#: (DDP) apart. A later override of the same key wins, so tests add their batch size and parallelism after it.
TWO_BLOCKS_CPU = (*TINY_CPU, "model.n_layer=2")

#: Three simulated-NPU workers on the test session's local Ray, a quarter of a CPU each (the 2-core host runs
#: them beside the driver): enough peers that a mechanism involving them is tested beyond a pair.
THREE_WORKERS = ("cluster=ray_local", "device=sim_npu", "cluster.workers=3", "cluster.cpus_per_worker=0.25")

#: Where the installed configs lie: the repository's ``conf/`` for an editable install, the package's copy
#: for a wheel.
CONF_DIR = Path(str(resources.files(CONFIG_MODULE)))


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed ``config.yaml`` of :data:`~trainer.config.CONFIG_MODULE` with Hydra command-line style
    ``overrides``."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


def make_config(*overrides: str) -> Config:
    """The composed and validated configuration."""
    return validate(compose_config(list(overrides)))
