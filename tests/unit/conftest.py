"""Fixtures of the unit tests: two committed checkpoints for the checkpoint-integrity tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.testing.checkpoint_pairs import Pair, make_pair


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def pair_template(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """A pair written once per module, copied per hypothesis example."""
    return make_pair(tmp_path_factory.mktemp("template") / "ckpt")
