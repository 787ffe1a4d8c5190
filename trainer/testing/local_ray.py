"""One local Ray advertising the simulated device families, for tests and benchmarks on one host."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

#: Slots a local Ray advertises per simulated family (the worker group asks for one per worker or spare).
SIMULATED_SLOTS = {"sim_npu": 4.0, "sim_cuda": 4.0}


@contextmanager
def local_ray(num_cpus: int = 2, worker_niceness: int = 0) -> Iterator[None]:
    """Start Ray on this host for the duration of the block, then shut it down and remove its files. Its
    workers run at nice ``worker_niceness``, as a run's local Ray starts them (``cluster.local_worker_niceness``).

    Its temp dir lives directly under /tmp (Ray's socket paths must stay short) and belongs to the caller.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=num_cpus,
        resources=dict(SIMULATED_SLOTS),
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
        _system_config={"worker_niceness": worker_niceness},
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
