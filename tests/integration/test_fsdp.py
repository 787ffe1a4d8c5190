"""Sharded state (``train.parallelism=fsdp``, torch's ``fully_shard``) on a real local Ray with gloo: a lost
worker's run finishes equal to an uninterrupted one, and a sharded run's checkpoint resumes on another
world size (and as DDP, and on one process) with the update of one process over the same samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import make_config
from trainer.testing.runs import events
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

JOB = (
    "device=sim_npu",
    "model.n_layer=2",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=12",
    "train.steps=16",
    "checkpoint.interval_steps=4",
    "probes.preflight=false",
    "monitoring=off",
)


def _group(workers: int, *extra: str) -> tuple[str, ...]:
    return (
        "cluster=ray_local",
        f"cluster.workers={workers}",
        "cluster.cpus_per_worker=0.25",
        "train.parallelism=fsdp",
        *JOB,
        *extra,
    )


def test_a_killed_fsdp_worker_is_replaced_and_the_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    """Rank 1 of 3 SIGKILLed before step 7: its shards are gone with it, so the group resumes from the
    checkpoint of step 4 (no member holds the state whole), repeats steps 5-6, and ends bit for bit where
    the uninterrupted run ends (same world size, same order of every reduction)."""
    clean = make_config(*_group(3))
    assert run(clean, run_dir=tmp_path / "clean") == ExitCode.FINISHED
    killed = make_config(*_group(3, "faults.kill_rank=1", "faults.kill_at_step=7"))
    assert run(killed, run_dir=tmp_path / "killed") == ExitCode.FINISHED

    [failure] = events(tmp_path / "killed", "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    [recovered] = events(tmp_path / "killed", "recovered")
    assert recovered["state_from"] == "disk checkpoint" and recovered["step"] == 4
    a = restored_state(clean, tmp_path / "clean" / "checkpoints")
    b = restored_state(clean, tmp_path / "killed" / "checkpoints")
    assert int(a["step"]) == int(b["step"]) == 16
    assert mismatched(a, b) == []


def test_a_sharded_checkpoint_resumes_on_other_world_sizes_as_one_process_would_train(tmp_path: Path) -> None:
    """3 sharded ranks to step 8, then 2 sharded ranks to 12, then one process to 16 — against one process
    all the way (SGD: the rounding of the averaged gradients stays small)."""
    sgd = ("optim=sgd", "optim.lr=0.05")
    single = make_config(*JOB, *sgd)
    assert run(single, run_dir=tmp_path / "single") == ExitCode.FINISHED

    mixed = tmp_path / "mixed"
    assert run(make_config(*_group(3, *sgd, "train.steps=8")), run_dir=mixed) == ExitCode.FINISHED
    assert run(make_config(*_group(2, *sgd, "train.steps=12")), run_dir=mixed) == ExitCode.FINISHED
    assert run(single, run_dir=mixed) == ExitCode.FINISHED
    assert [e["step"] for e in events(mixed, "resumed")] == [8, 12]

    reference = restored_state(single, tmp_path / "single" / "checkpoints")
    state = restored_state(single, mixed / "checkpoints")
    assert int(state["step"]) == 16
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    # The checkpoints hold whole tensors, in the format a DDP run writes: the model's full shapes.
    assert state["model/blocks.0.attn.qkv.weight"].shape == reference["model/blocks.0.attn.qkv.weight"].shape


def test_fsdp_with_fp16_is_refused_naming_what_is_allowed() -> None:
    from trainer.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"train\.parallelism=fsdp .*device\.precision=fp16.*allowed: fp32 or bf16"
    ):
        make_config(*_group(2), "device.precision=fp16")
