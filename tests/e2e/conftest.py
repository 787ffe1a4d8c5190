"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import make_config


@pytest.fixture(scope="session")
def r2_handover_run(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """One run of ``experiment=r2_handover`` (metrics served on a free port) for every test that examines
    it: ``(its config, its run directory)``. It takes about a minute here, so it runs once."""
    config = make_config("experiment=r2_handover", "monitoring.port=0")
    run_dir = tmp_path_factory.mktemp("r2") / "run"
    assert run(config, run_dir=run_dir) == ExitCode.FINISHED
    return config, run_dir
