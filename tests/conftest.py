"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from trainer.config import Config
from trainer.testing.configs import make_config as _make_config


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """``make_config("train.steps=4", ...)``: the composed, validated config with those overrides."""
    return _make_config
