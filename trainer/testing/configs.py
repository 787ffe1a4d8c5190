"""Compose the job's Hydra configuration outside ``@hydra.main`` (tests, notebooks, benchmarks)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from trainer.config import Config, validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed ``conf/config.yaml`` with Hydra command-line style ``overrides``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


def make_config(*overrides: str) -> Config:
    """The composed and validated configuration."""
    return validate(compose_config(list(overrides)))
