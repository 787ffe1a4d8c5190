"""A node lost: a two-node Ray cluster (``ray start``), the workers on the second node, that node killed.

The group cannot be repaired in place (its spares died with the node) nor rebuilt on the same family
(only that node had it), so the policy hands the run over to the family the head node has, from the newest
committed checkpoint, and the run finishes there. The cluster is the test's own (``ray start`` processes
in their own sessions, killed by the test), not the session's local Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trainer.errors import ExitCode

RAY = str(Path(sys.executable).with_name("ray"))
# A cluster started by `ray start` without a shared token: nodes and driver all run without auth.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        env=ENV,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for(address: str, resource: str, timeout_s: float = 120.0) -> None:
    """Until the cluster at ``address`` advertises ``resource`` (a node is up and registered)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = subprocess.run(
            [RAY, "status", f"--address={address}"], env=ENV, capture_output=True, text=True, timeout=60
        )
        if status.returncode == 0 and resource in status.stdout:
            return
        time.sleep(1.0)
    raise AssertionError(f"the test's Ray cluster at {address} never advertised {resource}")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A head with ``sim_cuda`` slots and a second node with ``sim_npu`` slots; yields (address, node 2)."""
    port = _free_port()
    temp = Path(f"/tmp/rn-{port}")
    head = _start(
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
        _wait_for(address, "sim_cuda")
        node = _start(
            [f"--address={address}", "--num-cpus=1", '--resources={"sim_npu": 3}'],
            tmp_path / "node2.log",
        )
        _wait_for(address, "sim_npu")
        yield address, node
    finally:
        if node is not None:
            _kill(node)
        _kill(head)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_lost_node_hands_the_run_to_the_family_left(
    two_nodes: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    address, node = two_nodes
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "trainer",
        "cluster=ray_existing",
        f"cluster.address={address}",
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
        f"hydra.run.dir={run_dir}",
    ]
    driver = subprocess.Popen(
        command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while not any(e["event"] == "checkpoint_saved" for e in _events(run_dir / "journal.jsonl")):
        assert driver.poll() is None and time.monotonic() < deadline, "the run never checkpointed"
        time.sleep(0.2)
    _kill(node)  # the node and every worker on it are gone
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == ExitCode.FINISHED, output.decode()[-3000:]

    events = _events(run_dir / "journal.jsonl")
    kinds = [(e["kind"], e["family"]) for e in events if e["event"] == "failure"]
    assert kinds[0] == ("worker_lost", "sim_npu")
    assert ("family_unavailable", "sim_npu") in kinds
    [fallback] = [d for d in events if d["event"] == "decision" and d["action"] == "fallback"]
    assert fallback["family"] == "sim_cuda"
    [parity] = [e for e in events if e["event"] == "parity_check"]
    assert parity["state_from"] == "newest committed checkpoint" and parity["passed"]
    [finished] = [e for e in events if e["event"] == "run_finished"]
    assert finished["family"] == "sim_cuda" and finished["step"] == 800
