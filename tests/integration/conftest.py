"""One local Ray for the whole test session, advertising simulated device families."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
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
