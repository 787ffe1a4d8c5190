"""The local Ray of ``cluster=ray_local``, started by ``ray.init()`` with its processes out of the driver's
process group.

``ray.init()`` starts Ray's own processes (GCS, raylet, their agents, the log monitor) as children of the
driver, in the driver's process group. A SIGTERM to that whole group — ``kill -TERM -<pgid>``, a batch
system stopping a job step, a shell's job control — would stop them together with the driver, and with
them every worker and the newest state, before the driver could save it. (Ctrl-C's SIGINT does not: Ray
starts its processes with SIGINT blocked. Ray's workers run in process groups of their own either way.)

So while ``ray.init()`` runs, each process it starts is put in a process group of its own (``setpgid`` in
the child before it executes, :class:`subprocess.Popen`'s ``process_group=0``); the raylet's agents follow
their raylet. Everything else stays as ``ray.init()`` makes it, in particular kernel fate-sharing: Ray's
processes still receive SIGKILL when the driver dies (``PR_SET_PDEATHSIG``), so a killed driver leaves
nothing running. (A head started with ``ray start --head`` in a session of its own would outlive a
SIGKILLed driver.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _own_process_groups() -> Iterator[None]:
    """While the block runs, processes Ray starts from this process run in process groups of their own."""
    from ray._private import services

    plain = services.ConsolePopen

    class OwnGroupPopen(services.ConsolePopen):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("process_group", 0)  # setpgid(0, 0) in the child, before it executes
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnGroupPopen  # type: ignore[misc]
    try:
        yield
    finally:
        services.ConsolePopen = plain  # type: ignore[misc]


def start_local_ray(num_cpus: int | None, resources: dict[str, float], worker_niceness: int = 0) -> None:
    """``ray.init()`` a Ray of this run on this host, its processes out of this process's group, its workers
    (the ranks, spares and probes) at nice ``worker_niceness`` (``cluster.local_worker_niceness``).

    Warns, naming them, if any of Ray's processes still shares the driver's process group (a Ray whose
    start-up changed): the run works, but a SIGTERM to the group would stop them before it is saved.
    """
    import ray

    with _own_process_groups():
        ray.init(
            num_cpus=num_cpus,
            resources=resources,
            include_dashboard=False,
            log_to_driver=False,
            _system_config={"worker_niceness": worker_niceness},
        )
    shared = in_my_process_group()
    if shared:
        log.warning(
            "the local Ray's processes %s share the driver's process group %d: a SIGTERM to the whole group "
            "would stop them before the run is saved (send it to the driver alone)",
            shared,
            os.getpgrp(),
        )


def in_my_process_group() -> list[str]:
    """The local Ray's processes (``name:pid``) that are in this process's group; empty when none is."""
    import ray

    node = ray._private.worker.global_worker.node
    if node is None:  # connected to a Ray started elsewhere: none of its processes is this driver's child
        return []
    mine = os.getpgrp()
    shared: list[str] = []
    for kind, infos in node.all_processes.items():
        for info in infos:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(info.process.pid) == mine:
                    shared.append(f"{kind}:{info.process.pid}")
    return shared
