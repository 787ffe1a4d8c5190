"""Ray clusters of several nodes on this one host, for tests of node loss and of capacity that comes and goes.

Each node is a ``ray start --block`` process in a session of its own (so a signal to the test's process
group does not reach it), killed with its whole process group by :func:`kill_node`. The cluster runs
without Ray's token authentication (``RAY_AUTH_MODE=disabled`` for the nodes and for the driver, through
:data:`ENV`) and with a short health-check period, so that a killed node is declared dead within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.testing.s3 import free_port

RAY = str(Path(sys.executable).with_name("ray"))
#: The environment for the nodes and for a driver joining them.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500"}

__all__ = ["ENV", "RAY", "free_port", "journal_events", "kill_node", "start_node", "wait_for_resource"]


def start_node(
    args: list[str], log: Path, wrap: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``ray start --block`` with ``args`` (``--head ...`` or ``--address=...``), its output in ``log``;
    ``wrap``: a command line it runs under (e.g. ``unshare``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [*(wrap or []), RAY, "start", "--block", "--disable-usage-stats", *args],
        env={**ENV, **(env or {})},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_resource(address: str, resource: str, timeout_s: float = 120.0) -> None:
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


def kill_node(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the node's whole process group (raylet, workers, object store) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def journal_events(path: Path) -> list[dict[str, Any]]:
    """The entries of a run's journal written so far (none before it exists)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
