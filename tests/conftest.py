"""Shared fixtures."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One S3-compatible server (moto's, its own process on 127.0.0.1) for the whole session."""
    from trainer.testing.s3 import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_run(s3_endpoint: str) -> tuple[str, dict[str, str], str]:
    """A fresh bucket: ``(checkpoint.dir URL, checkpoint.storage_options, bucket name)``."""
    from trainer.testing.s3 import new_bucket, storage_options

    bucket = new_bucket(s3_endpoint)
    return f"s3://{bucket}/run", storage_options(s3_endpoint), bucket


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 KiB tmpfs: room for one small checkpoint, not two (a disk that fills up). Needs root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
