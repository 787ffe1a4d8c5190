"""A peer snapshot copied through the rank's checkpoint staging buffers (one copy of the state in host
memory for checkpoints and snapshots alike) on a real Ray actor: the snapshot Ray holds is the state at the
snapshot, not whatever a later save writes into the same buffers; and a snapshot taken while a save is still
writing takes a copy of its own instead of waiting for the write."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.cluster.group import WorkerGroup
from trainer.devices import get_adapter
from trainer.errors import CheckpointWriteError
from trainer.testing.configs import make_config
from trainer.worker import Worker

SMALL = ("model.n_layer=1", "model.n_embd=16", "model.seq_len=8", "train.global_batch_size=4")


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_a_snapshot_uses_the_staging_buffers_unless_a_save_is_writing(tmp_path: Path) -> None:
    worker = Worker(make_config("device=cpu", "monitoring=off", *SMALL))
    worker.setup()
    worker.train_step()
    checkpointer = AsyncCheckpointer(CheckpointManager(tmp_path / "ckpt"))
    worker.save_async(checkpointer)
    checkpointer.wait()
    buffers = {k: t.data_ptr() for k, t in checkpointer.staging.tensors.items()}

    worker.train_step()
    state = {k: t.detach().clone() for k, t in worker.capture().tensors.items()}
    lent = worker.snapshot(checkpointer)
    assert {k: t.data_ptr() for k, t in lent["tensors"].items()} == buffers  # no second copy
    assert not _differ(lent["tensors"], state)

    # A save still writing: the snapshot does not wait for it, and takes a copy of its own.
    release = threading.Event()
    write = checkpointer.manager.save
    checkpointer.manager.save = lambda *a, **kw: release.wait(30) and write(*a, **kw)  # a slow disk
    try:
        worker.save_async(checkpointer)
        assert checkpointer.busy
        own = worker.snapshot(checkpointer)
        assert checkpointer.busy  # taken without waiting for the write
        assert not set(t.data_ptr() for t in own["tensors"].values()) & set(buffers.values())
        assert not _differ(own["tensors"], state)
    finally:
        release.set()
        checkpointer.wait()

    # A save that could not be written (a full disk) does not fail the next snapshot, and its failure is
    # still there for the driver's next flush to report.
    def fail(*args: Any, **kwargs: Any) -> None:
        raise CheckpointWriteError("no space left on device (stand-in)")

    checkpointer.manager.save = fail
    worker.save_async(checkpointer)
    deadline = time.monotonic() + 30
    while checkpointer.busy:  # the write has failed: the buffers are free again
        assert time.monotonic() < deadline, "the failing write never ended"
        time.sleep(0.01)
    after = worker.snapshot(checkpointer)
    assert not _differ(after["tensors"], state)
    with pytest.raises(CheckpointWriteError, match="no space left"):
        checkpointer.wait()
    checkpointer.close()


@pytest.fixture
def member(local_ray: None) -> Iterator[Any]:
    config = make_config(
        "cluster=ray_local", "device=sim_npu", "cluster.workers=1", "cluster.spares=0", *SMALL
    )
    group = WorkerGroup(config, get_adapter("sim_npu"), "127.0.0.1")
    group.start()
    group.form(timeout_s=60.0)
    yield group.members[0]
    group.shutdown()


def test_a_staged_snapshot_held_by_ray_outlives_the_next_save(member: Any, tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    ray.get(member.train.remote(2), timeout=60)
    ray.get(member.save.remote(root, 2), timeout=60)
    ray.get(member.flush.remote(), timeout=60)  # the write done: the snapshot below takes the buffers

    ref = member.snapshot.remote()
    at_snapshot = ray.get(ref, timeout=60)["tensors"]
    ray.get(member.train.remote(4), timeout=60)
    ray.get(member.save.remote(root, 2), timeout=60)  # the staging buffers now hold step 4's state
    ray.get(member.flush.remote(), timeout=60)

    again = ray.get(ref, timeout=60)["tensors"]  # from Ray's object store, anew
    assert not _differ(again, at_snapshot)
    later = ray.get(member.snapshot.remote(), timeout=60)
    assert later["step"] == 4 and _differ(later["tensors"], at_snapshot)  # the buffers did change
