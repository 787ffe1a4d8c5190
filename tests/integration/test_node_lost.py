"""A node lost: a two-node Ray cluster (``ray start``), the workers on the second node, that node killed.

The group cannot be repaired in place (its spares died with the node) nor rebuilt on the same family
(only that node had it), so the policy hands the run over to the family the head node has, from the newest
committed checkpoint, and the run finishes there. The cluster is the test's own (``ray start`` processes
in their own sessions, killed by the test), not the session's local Ray.

Both nodes run on this host, so node 2 is given a disk of its own: a private mount namespace with a tmpfs
over the test's directory and its temp directory. A local ``checkpoint.dir`` its workers cannot see is
refused at launch; with checkpoints on object storage (the S3 server) the run survives the node.

Slow (about three minutes for the node loss): ``scripts/test.sh --slow``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer.errors import ExitCode
from trainer.testing.nodes import ENV, free_port, journal_events, kill_node, start_node, wait_for_resource

pytestmark = pytest.mark.slow


def _isolation_unavailable() -> str | None:
    """Why node 2 cannot get a disk of its own here (a private mount namespace needs CAP_SYS_ADMIN)."""
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if probe.returncode == 0 else f"unshare --mount is not permitted here: {probe.stderr.strip()}"


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A head with ``sim_cuda`` slots and a second node with ``sim_npu`` slots; yields (address, node 2).

    Node 2 runs in a private mount namespace with an empty tmpfs over the test's directory (where the run
    directory lives) and over its own temp directory: like a real second machine, it does not see what the
    driver writes there, and what it writes there is gone when it is killed."""
    why = _isolation_unavailable()
    if why is not None:
        pytest.skip(why)
    port = free_port()
    temp = Path(f"/tmp/rn-{port}")
    node_tmp = tmp_path / "node2-tmp"
    node_tmp.mkdir()
    head = start_node(
        [
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            '--resources={"sim_cuda": 3}',
            "--include-dashboard=false",
            f"--temp-dir={temp}",
        ],
        tmp_path / "head.log",
    )
    node = None
    address = f"127.0.0.1:{port}"
    try:
        wait_for_resource(address, "sim_cuda")
        isolate = f'mount -t tmpfs tmpfs {tmp_path} && mkdir {node_tmp} && exec "$@"'
        node = start_node(
            [f"--address={address}", "--num-cpus=1", '--resources={"sim_npu": 3}'],
            temp / "node2.log",
            wrap=["unshare", "--mount", "--propagation", "private", "sh", "-c", isolate, "node2"],
            env={"TMPDIR": str(node_tmp)},
        )
        wait_for_resource(address, "sim_npu")
        yield address, node
    finally:
        if node is not None:
            kill_node(node)
        kill_node(head)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


COMMAND = (
    "-m",
    "trainer",
    "cluster=ray_existing",
    "device=sim_npu",
    "cluster.cpus_per_worker=0.25",
    # Generous: three actors importing torch on a busy 2-core host can take over 10 s to start. A rebuild
    # after the node is gone does not wait for it: the family's resource has left the cluster by then.
    "cluster.start_timeout_s=60",
    "fault_tolerance.fallback_chain=[sim_cuda]",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=800",
    "checkpoint.interval_steps=20",
    "cluster.chunk_steps=5",
    "monitoring=off",
)


def test_a_checkpoint_dir_the_workers_node_cannot_see_is_refused_at_launch(
    two_nodes: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    address, _ = two_nodes
    run_dir = tmp_path / "run"
    driver = subprocess.run(
        [sys.executable, *COMMAND, f"cluster.address={address}", f"hydra.run.dir={run_dir}"],
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert driver.returncode == ExitCode.CONFIG_ERROR, driver.stdout[-3000:] + driver.stderr[-3000:]
    said = driver.stdout + driver.stderr
    assert f"checkpoint.dir={run_dir / 'checkpoints'} is not shared with the nodes of 3 of 3 workers" in said
    assert "checkpoint.dir=s3://bucket/prefix" in said
    assert [e["event"] for e in journal_events(run_dir / "journal.jsonl") if e["event"] == "step"] == []


def test_lost_node_hands_the_run_to_the_family_left_from_object_storage(
    two_nodes: tuple[str, subprocess.Popen[bytes]], tmp_path: Path, s3_run: tuple[str, dict[str, str], str]
) -> None:
    """The workers' node is killed; the run resumes on the head's family from the newest checkpoint on the
    S3 server. Nothing the lost node wrote locally (its upload spools) survives it."""
    address, node = two_nodes
    url, options, _ = s3_run
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        *COMMAND,
        f"cluster.address={address}",
        f"hydra.run.dir={run_dir}",
        f"checkpoint.dir={url}",
        *(f"+checkpoint.storage_options.{k}={v}" for k, v in options.items()),
    ]
    driver = subprocess.Popen(
        command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while not any(e["event"] == "checkpoint_saved" for e in journal_events(run_dir / "journal.jsonl")):
        assert driver.poll() is None and time.monotonic() < deadline, "the run never checkpointed"
        time.sleep(0.2)
    kill_node(node)  # the node, every worker on it, and its tmpfs are gone
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == ExitCode.FINISHED, output.decode()[-3000:]

    events = journal_events(run_dir / "journal.jsonl")
    kinds = [(e["kind"], e["family"]) for e in events if e["event"] == "failure"]
    assert kinds[0] == ("worker_lost", "sim_npu")
    assert ("family_unavailable", "sim_npu") in kinds
    [fallback] = [d for d in events if d["event"] == "decision" and d["action"] == "fallback"]
    assert fallback["family"] == "sim_cuda"
    started = next(i for i, e in enumerate(events) if e["event"] == "handover_started")
    saved = max(e["step"] for e in events[:started] if e["event"] == "checkpoint_saved")
    [parity] = [e for e in events if e["event"] == "parity_check"]
    assert parity["state_from"] == "newest committed checkpoint" and parity["passed"]
    [handover] = [e for e in events if e["event"] == "handover_completed"]
    assert handover["state_step"] >= saved > 0  # resumed from the object store, not from scratch
    [finished] = [e for e in events if e["event"] == "run_finished"]
    assert finished["family"] == "sim_cuda" and finished["step"] == 800
