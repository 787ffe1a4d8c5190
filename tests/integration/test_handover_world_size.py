"""A hand-over to a family with another world size (``cluster.family_workers``): 3 DDP workers on sim_npu hand
the run over to 2 on sim_cuda, through a live worker's snapshot; the global batch is split over 2 ranks from
then on, the parity check passes, and the final model is the one a single process trains over the same
samples (to float tolerance: 3, then 2, ranks sum the gradients in other orders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointStore
from trainer.checkpoint.manifest import Manifest
from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import THREE_WORKERS, make_config
from trainer.testing.runs import events
from trainer.testing.state import restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

SMALL = (
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=12",
    "train.steps=20",
    "checkpoint.interval_steps=10",
    "monitoring=off",
    "optim=sgd",
)


def test_three_npu_workers_hand_over_to_two_cuda_workers(tmp_path: Path) -> None:
    config = make_config(
        *SMALL,
        *THREE_WORKERS,
        "cluster.spares=0",
        "cluster.chunk_steps=5",
        "+cluster.family_workers.sim_cuda=2",
        # Every in-flight probe on sim_npu reads as degraded (an unreachable baseline): handed over at step 10.
        "probes.preflight=false",
        "probes.interval_steps=10",
        "+probes.baseline_busbw.sim_npu=1e15",
        "fault_tolerance.max_degraded_probes=1",
        "fault_tolerance.fallback_chain=[sim_cuda]",
    )
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FINISHED
    [started] = events(tmp_path / "run", "handover_started")
    assert (started["step"], started["to_family"]) == (10, "sim_cuda")
    [parity] = events(tmp_path / "run", "parity_check")
    assert parity["passed"] and parity["state_from"].startswith("peer snapshot")
    assert events(tmp_path / "run", "run_finished")[-1]["step"] == 20
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    assert events(tmp_path / "run", "run_started")[0]["world_size"] == 3
    assert Manifest.read(store.committed()[-1]).world_size == 2  # the final save, by the 2 sim_cuda ranks

    one = make_config(*SMALL, "device=sim_cuda")
    assert run(one, run_dir=tmp_path / "one") == ExitCode.FINISHED
    handed = restored_state(config, store.root)
    alone = restored_state(one, tmp_path / "one" / "checkpoints")
    model = [k for k in alone if k.startswith("model/")]
    assert model and all(torch.allclose(handed[k], alone[k], rtol=1e-4, atol=1e-6) for k in model)
