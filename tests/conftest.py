"""Shared fixtures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest

from trainer.config import Config
from trainer.testing.configs import make_config as _make_config

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
    import ray

    # Ray's socket paths must stay short, so its temp dir lives directly under /tmp; the test owns it.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=2,
        resources={"sim_npu": 4.0, "sim_cuda": 4.0},
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
