"""The local Ray of ``cluster=ray_local``: a head node started with ``ray start --head`` in a session of its
own, which the driver attaches to, and stops at the end.

``ray.init()`` would start Ray's processes (GCS, raylet) as the driver's children in the driver's process
group, so a signal to the whole group — Ctrl-C in a terminal, SLURM's SIGTERM to a job step — would kill
them, and with them every worker and the newest state, before the driver could save it. In a session of
their own they only stop when the driver stops them, after its preemption save. Ray's workers run in
process groups of their own either way.

The head is private to the run: auth is off (``RAY_AUTH_MODE=disabled``, for it and for this driver) and it
lives as long as the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from trainer.errors import ClusterUnreachableError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_head(num_cpus: int | None, resources: dict[str, float], timeout_s: float) -> Iterator[str]:
    """Start a Ray head on this host; yields its address (``127.0.0.1:PORT``); stops it and removes its files
    afterwards. Raises :class:`ClusterUnreachableError` if it does not come up within ``timeout_s``."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    os.environ["RAY_AUTH_MODE"] = "disabled"
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        f"--resources={json.dumps(resources)}",
        *([f"--num-cpus={num_cpus}"] if num_cpus else []),
    ]
    log = Path(temp) / "ray-start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if head.poll() is not None:
                raise ClusterUnreachableError(
                    f"the local Ray head exited at start (code {head.returncode}): {log.read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterUnreachableError(
                        f"the local Ray head did not answer within cluster.start_timeout_s={timeout_s}"
                    ) from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # the run is over: nothing of it is left to save
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
