"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from trainer.config import Config
from trainer.testing.configs import make_config as _make_config
from trainer.testing.local_ray import local_ray as start_local_ray

#: Test runs serve metrics on a free port, never the default one: test sessions and a running demo on the
#: same host must not collide.
FREE_METRICS_PORT = "monitoring.port=0"


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """``make_config("train.steps=4", ...)``: the composed, validated config with those overrides
    (metrics on a free port unless the test chooses the monitoring settings itself)."""

    def make(*overrides: str) -> Config:
        if any(o.lstrip("+~").startswith("monitoring") for o in overrides):
            return _make_config(*overrides)
        return _make_config(*overrides, FREE_METRICS_PORT)

    return make


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """One local Ray for the whole session, advertising the simulated device families."""
    with start_local_ray():
        yield
