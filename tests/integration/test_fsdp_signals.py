"""The survival signals under FSDP (``train.parallelism=fsdp``, :mod:`trainer.sharding_comms`) on a real local
Ray with 3 gloo ranks: a rank hung in compute is the only one replaced (its peers wait for it inside FSDP's
all-gather, marked "collective"); a slow device is named the straggler (its peers' waits for it in the
collectives are not their compute time); an injected link fault fails the step inside FSDP's collectives,
and the policy gives the family up for another."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import THREE_WORKERS, make_config
from trainer.testing.runs import events

pytestmark = pytest.mark.usefixtures("local_ray")

THREE = (
    *THREE_WORKERS,
    "train.parallelism=fsdp",
    "model.n_layer=2",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=12",
    "train.steps=16",
    "checkpoint.interval_steps=4",
    "cluster.chunk_steps=4",
    "probes.preflight=false",
    "monitoring=off",
)


def test_an_fsdp_rank_hung_in_compute_is_the_only_one_replaced(tmp_path: Path) -> None:
    hung = make_config(
        *THREE, "faults.hang_rank=1", "faults.hang_at_step=7", "fault_tolerance.hang_floor_s=2"
    )
    assert run(hung, run_dir=tmp_path) == ExitCode.FINISHED
    [detected] = events(tmp_path, "hang_detected")
    assert detected["ranks"] == [1]  # ranks 0 and 2 waited for it in the forward's all-gather
    assert events(tmp_path, "ranks_not_released") == []
    [recovered] = events(tmp_path, "recovered")
    # No member holds the sharded state whole: every rank loads its own copy of its shards from the chunk end
    # before (step 4), the hung rank's replacement too.
    assert recovered["replaced_ranks"] == [1]
    assert recovered["state_from"] == "shard copies at step 4" and recovered["step"] == 4
    assert events(tmp_path, "run_finished")[-1]["step"] == 16


@pytest.mark.slow  # the collectives' bookkeeping is proved in tests/unit/test_sharding_comms.py
def test_a_slow_fsdp_device_is_flagged_as_the_straggler_and_excluded(tmp_path: Path) -> None:
    config = make_config(
        *THREE,
        "+faults.families={sim_npu: {straggler_rank: 1, straggler_delay_s: 0.3}}",
        "fault_tolerance.straggler_strikes=2",
    )
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    flagged = events(tmp_path, "straggler_flagged")
    assert [f["rank"] for f in flagged][:2] == [1, 1]  # not its peers, though they waited as long
    assert flagged[0]["compute_s"] > config.fault_tolerance.straggler_factor * flagged[0]["median_s"]
    [decision] = [d for d in events(tmp_path, "decision") if d["action"] == "exclude"]
    assert decision["ranks"] == [1]
    [recovered] = events(tmp_path, "recovered")
    assert recovered["action"] == "exclude" and recovered["replaced_ranks"] == [1]
    assert events(tmp_path, "run_finished")[-1]["step"] == 16


@pytest.mark.slow  # a hand-over; the faults' path is proved in tests/unit/test_sharding_comms.py
def test_an_injected_link_fault_fails_fsdp_collectives_and_the_family_is_given_up(tmp_path: Path) -> None:
    """From step 5 (a chunk's first) every collective of the sim_npu family fails: the step fails inside
    FSDP's all-gather on every rank, a collective failure (not the task's error), and the policy falls back to
    sim_cuda, which resumes from the old group's state at step 4, passes the parity check and finishes."""
    config = make_config(
        *THREE,
        "+faults.families={sim_npu: {collective_error_rate: 1.0, degrade_from_step: 5}}",
        "fault_tolerance=npu_to_cuda",
        "fault_tolerance.max_failures_per_family=1",
    )
    assert run(config, run_dir=tmp_path) == ExitCode.FINISHED
    [failure] = events(tmp_path, "failure")
    assert failure["kind"] == "collective_failed" and failure["family"] == "sim_npu"
    assert "injected collective failure" in failure["detail"]
    [decision] = events(tmp_path, "decision")
    assert decision["action"] == "fallback" and decision["family"] == "sim_cuda"
    [parity] = events(tmp_path, "parity_check")
    assert parity["step"] == 4 and parity["passed"]
    [finished] = events(tmp_path, "run_finished")
    assert finished["family"] == "sim_cuda" and finished["step"] == 16
