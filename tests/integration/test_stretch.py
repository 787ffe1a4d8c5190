"""Ranks train on past a chunk's end towards the next fixed point (:mod:`trainer.cluster.stretch`): a run on a
3-worker Ray group cut into chunks of 2 steps, which its ranks train through without waiting for the driver
between two checkpoints, journals every chunk — contiguous, as cut — and ends in the same state, bit for bit,
as the same run with one chunk per checkpoint interval (where the ranks wait for the driver at each). With
``cluster.chunk_s``, a chunk holds as many steps as fill it at the measured step time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.testing.configs import THREE_WORKERS
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

OVERRIDES = (
    *THREE_WORKERS,
    "cluster.spares=0",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=6",
    "train.steps=13",
    "checkpoint.interval_steps=6",
    "probes.preflight=false",
    "monitoring=off",
)


def test_chunks_trained_through_end_as_one_chunk_per_checkpoint_does(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    through = make_config(*OVERRIDES, "cluster.chunk_steps=2")
    assert run(through, run_dir=tmp_path / "through") == ExitCode.FINISHED
    waiting = make_config(*OVERRIDES, "cluster.chunk_steps=6")
    assert run(waiting, run_dir=tmp_path / "waiting") == ExitCode.FINISHED

    beats = [
        (e["first_step"], e["step"])
        for e in Journal(tmp_path / "through" / "journal.jsonl").read()
        if e["event"] == "heartbeat"
    ]
    # Cut every 2 steps and at each fixed point (the checkpoints of 6 and 12, the end at 13).
    assert [step for _, step in beats] == [2, 4, 6, 8, 10, 12, 13]
    assert [first for first, _ in beats] == [1, 3, 5, 7, 9, 11, 13]
    a = restored_state(through, tmp_path / "through" / "checkpoints")
    assert mismatched(a, restored_state(waiting, tmp_path / "waiting" / "checkpoints")) == []


def test_chunks_of_seconds_hold_as_many_steps_as_fill_them(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """``cluster.chunk_s=30``: the first chunk, before any step time is measured, is ``chunk_steps`` long;
    then every chunk runs to the next fixed point (30 s hold far more than a checkpoint interval of this
    model's steps). Without ``chunk_s`` the same run is cut every 2 steps."""
    config = make_config(
        *OVERRIDES,
        "cluster.chunk_steps=2",
        "cluster.chunk_s=30",
        "train.steps=40",
        "checkpoint.interval_steps=20",
    )
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    beats = [
        (e["first_step"], e["step"])
        for e in Journal(tmp_path / "journal.jsonl").read()
        if e["event"] == "heartbeat"
    ]
    assert beats == [(1, 2), (3, 20), (21, 40)]
