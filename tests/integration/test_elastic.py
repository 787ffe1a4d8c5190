"""Elastic shrink and grow on a real two-node Ray cluster (``ray start`` processes on this host).

The head has two ``sim_npu`` slots, node 2 one: a 3-worker group without spares has a rank on node 2. When
that node is killed the rank cannot be replaced (no spare, and its slot is gone with the node), so with
``cluster.min_workers=2`` the run goes on with the two workers the head holds — the global batch split
4 + 4 instead of 3 + 3 + 2, the data position exact. Node 2 is started again and the run grows back to 3.
The final state equals a one-process run's over the same samples (up to the rounding of the gradient
average, which changes with the world size).

Slow (about three minutes): ``scripts/test.sh --slow``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainer.errors import ExitCode
from trainer.job import run
from trainer.testing.configs import make_config
from trainer.testing.nodes import ENV, free_port, journal_events, kill_node, start_node, wait_for_resource
from trainer.testing.state import restored_state

pytestmark = pytest.mark.slow

JOB = (
    "device=sim_npu",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "optim=sgd",
    "optim.lr=0.05",
    "train.global_batch_size=8",
    "train.steps=1200",
    "checkpoint.interval_steps=100",
    "monitoring=off",
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The head (two ``sim_npu`` slots); yields its address and the directory of the nodes' logs."""
    port = free_port()
    temp = Path(f"/tmp/re-{port}")
    head = start_node(
        [
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            '--resources={"sim_npu": 2}',
            "--include-dashboard=false",
            f"--temp-dir={temp}",
        ],
        tmp_path / "logs" / "head.log",
    )
    try:
        wait_for_resource(f"127.0.0.1:{port}", "sim_npu")
        yield f"127.0.0.1:{port}", tmp_path / "logs"
    finally:
        kill_node(head)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _node(address: str, log: Path) -> subprocess.Popen[bytes]:
    return start_node([f"--address={address}", "--num-cpus=1", '--resources={"sim_npu": 1}'], log)


def _wait_for_event(
    run_dir: Path, event: str, driver: subprocess.Popen[bytes], timeout_s: float = 240
) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(e["event"] == event for e in journal_events(run_dir / "journal.jsonl")):
        assert driver.poll() is None, f"the run ended before {event}: exit {driver.returncode}"
        assert time.monotonic() < deadline, f"no {event} within {timeout_s} s"
        time.sleep(0.2)


def test_a_lost_node_shrinks_the_group_to_what_is_left_and_it_grows_back_when_the_node_returns(
    cluster: tuple[str, Path], tmp_path: Path
) -> None:
    address, logs = cluster
    node = _node(address, logs / "node2.log")
    wait_for_resource(address, "/3.0 sim_npu")  # node 2 registered: three slots in all
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "trainer",
        "cluster=ray_existing",
        f"cluster.address={address}",
        "cluster.workers=3",
        "cluster.spares=0",
        "cluster.min_workers=2",
        "cluster.cpus_per_worker=0.25",
        "cluster.start_timeout_s=30",
        # Steps of a few ms on a shared 2-core host vary by more than the straggler factor: not the subject.
        "fault_tolerance.straggler_strikes=1000",
        # Every collective waits 20 ms: the run lasts long enough for the node to go and come back.
        "+faults.families={sim_npu: {collective_delay_s: 0.02}}",
        *JOB,
        f"hydra.run.dir={run_dir}",
    ]
    driver = subprocess.Popen(
        command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        _wait_for_event(run_dir, "checkpoint_saved", driver)
        kill_node(node)  # rank 2's worker and its slot are gone
        _wait_for_event(run_dir, "group_resized", driver)
        node = _node(address, logs / "node2-again.log")  # its slot is back: the group grows to 3 again
        output, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_node(node)
    assert driver.returncode == ExitCode.FINISHED, output.decode()[-3000:]

    events = journal_events(run_dir / "journal.jsonl")
    shrunk, grown = [e for e in events if e["event"] == "group_resized"]
    assert (shrunk["from_workers"], shrunk["to_workers"]) == (3, 2)
    assert (grown["from_workers"], grown["to_workers"]) == (2, 3)
    assert grown["reason"] == "capacity for the missing workers is back"
    assert [e["kind"] for e in events if e["event"] == "failure"] == ["worker_lost"]
    assert not any(e["event"] == "handover_started" for e in events), "the family was never given up"
    [finished] = [e for e in events if e["event"] == "run_finished"]
    assert finished["step"] == 1200

    # The same 1200 global batches as one process: the update is each batch's mean on 3, 2 and 3 ranks.
    single = make_config(*JOB)
    assert run(single, run_dir=tmp_path / "single") == ExitCode.FINISHED
    reference = restored_state(single, tmp_path / "single" / "checkpoints")
    state = restored_state(single, run_dir / "checkpoints")
    for key in reference:
        if key.startswith("model/"):
            torch.testing.assert_close(state[key], reference[key], rtol=1e-3, atol=1e-4, msg=key)
