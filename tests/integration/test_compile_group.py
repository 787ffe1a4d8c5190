"""A compiled model (``train.compile=true``) under the survival machinery: three Ray workers, rank 1
SIGKILLed mid-run, its replacement compiles the model afresh and takes the state from a peer's snapshot
(DDP) or every rank from its copy of its shards (FSDP), and the run ends bit for bit where the
uninterrupted compiled run ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import THREE_WORKERS, make_config
from trainer.testing.runs import events
from trainer.testing.state import mismatched, restored_state

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]

COMPILED = (
    *THREE_WORKERS,
    "train.compile=true",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=12",
    "train.steps=12",
    "cluster.chunk_steps=3",
    "checkpoint.interval_steps=6",
    "probes.preflight=false",
    "monitoring=off",
    # Limits far below a compilation's seconds: only the ranks' "compile" phase keeps them from being hung.
    "fault_tolerance.hang_floor_s=1",
    "cluster.deadline_floor_s=2",
)


@pytest.mark.parametrize(
    ("parallelism", "state_from"), [("ddp", "peer snapshot from rank"), ("fsdp", "shard copies")]
)
def test_a_killed_rank_of_a_compiled_model_is_replaced_and_the_run_ends_bit_for_bit(
    parallelism: str, state_from: str, tmp_path: Path
) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    config = make_config(*COMPILED, f"train.parallelism={parallelism}")
    assert run(config, run_dir=clean) == ExitCode.FINISHED

    kill = ("faults.kill_rank=1", "faults.kill_at_step=8")
    assert run(make_config(*COMPILED, f"train.parallelism={parallelism}", *kill), run_dir=killed) == (
        ExitCode.FINISHED
    )

    assert events(clean, "failure") == [] and events(killed, "hang_detected") == []
    [failure] = events(killed, "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    [recovered] = events(killed, "recovered")
    assert recovered["replaced_ranks"] == [1] and recovered["state_from"].startswith(state_from), recovered
    assert events(killed, "run_finished")[-1]["step"] == 12
    assert (
        mismatched(
            restored_state(config, clean / "checkpoints"), restored_state(config, killed / "checkpoints")
        )
        == []
    )
