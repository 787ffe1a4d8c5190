"""The survival signals of a DDP step in real processes joined by gloo (``Worker._weighted_backward``): a rank
waiting in the gradient all-reduce for a slow peer is marked "collective" and its wait is not counted as its
compute time; the family's link faults act there, as the framework's failure; and DDP's one re-layout of
its buckets — a broadcast it would make inside the user's forward — is made before it, so that a peer lost
then is not taken for the user's error.

Three ranks (DDP's bucket layout fixed before the first step) run the signals: a first step without
faults, then rank 2 a straggler and every collective failing from step 3. Two ranks (DDP's own layout,
re-laid after the first step) run the lost peer: rank 1 leaves after one step.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.faults import WorkerFaults
from trainer.testing.configs import TWO_BLOCKS_CPU, make_config
from trainer.testing.observed import failed_step, observed_step
from trainer.testing.s3 import free_port
from trainer.worker import Worker

#: How long the straggler's device takes longer per step.
DELAY_S = 1.0
OVERRIDES = (
    *TWO_BLOCKS_CPU,
    "train.global_batch_size=6",
    f"+faults.families={{cpu: {{straggler_rank: 2, straggler_delay_s: {DELAY_S}, "
    "collective_error_rate: 1.0, degrade_from_step: 3}}",
)


def _joined(rank: int, world: int, port: int) -> Worker:
    timeout = datetime.timedelta(seconds=30)  # a rank left waiting fails, not hangs the test
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
    )
    worker = Worker(make_config(*OVERRIDES))
    worker.setup()
    worker.attach(rank, world)
    return worker


def _signals(rank: int, port: int, out: str) -> None:
    worker = _joined(rank, 3, port)
    worker.train_step()
    worker.faults = WorkerFaults(worker.config, "cpu", rank, worker.step, armed=True)
    dist.barrier()
    record: dict[str, Any] = {"straggled": observed_step(worker)}
    record.update(failed_step(worker))
    Path(out, f"{rank}.json").write_text(json.dumps(record))
    os._exit(0)  # the failed step's all-reduce may still be in flight on gloo's threads: no teardown


def _peer_lost(rank: int, port: int, out: str) -> None:
    worker = _joined(rank, 2, port)
    worker.train_step()
    if rank == 1:
        os._exit(0)  # gone after its first step: its connections close
    record = {"rebuilt_before": bool(worker.model._has_rebuilt_buckets), **failed_step(worker)}  # type: ignore[union-attr]
    Path(out, f"{rank}.json").write_text(json.dumps(record))
    os._exit(0)  # its group's peer is gone: no orderly teardown to wait for


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_signals, args=(free_port(), str(out)), nprocs=3)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(3)]


def test_a_rank_waiting_for_a_straggler_is_in_the_all_reduce_and_its_wait_is_not_compute(
    ranks: list[dict[str, Any]],
) -> None:
    slow = ranks[2]["straggled"]
    assert slow["compute_s"] >= DELAY_S  # straggler detection names rank 2
    for peer in (ranks[0]["straggled"], ranks[1]["straggled"]):
        # Each peer finished its backward and waited in the all-reduce for rank 2's slow device.
        assert "collective" in peer["phases"] and peer["after"] == "idle"
        assert peer["step_s"] - peer["compute_s"] > DELAY_S / 2
        assert peer["compute_s"] < slow["compute_s"]


def test_injected_link_faults_fail_the_all_reduce_as_the_frameworks_failure(
    ranks: list[dict[str, Any]],
) -> None:
    for record in ranks:
        assert record["raised"] == "InjectedCollectiveError"
        assert record["collective_failed"] is True and record["step"] == 2


def test_a_peer_lost_when_ddp_lays_out_its_buckets_again_is_not_the_users_error(tmp_path: Path) -> None:
    context = mp.start_processes(_peer_lost, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    while not context.join(timeout=60):
        pass
    record = json.loads((tmp_path / "0.json").read_text())
    assert record["rebuilt_before"] is False  # DDP's own layout: re-laid at the second step
    # The re-layout's broadcast failed before the task's forward: a collective failure, not a UserCodeError.
    assert record["raised"] == "RuntimeError"
    assert record["collective_failed"] is True and record["step"] == 1
