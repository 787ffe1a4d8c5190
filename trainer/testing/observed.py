"""Watching a worker's step as the driver's hang check would (the progress phases it showed while it ran), and
how a step that fails ends (what it raised, whether the framework took it for a collective's failure)."""

from __future__ import annotations

import threading
import time
from typing import Any

from trainer.worker import Worker


def observed_step(worker: Worker) -> dict[str, Any]:
    """One train step, with the phases the hang check would have read of this rank while it ran."""
    phases: list[str] = []
    stepping = threading.Event()

    def sample() -> None:
        while stepping.is_set():
            phases.append(worker.progress["phase"])
            time.sleep(0.005)

    stepping.set()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = worker.train_step()
    finally:
        stepping.clear()
        sampler.join()
    return {
        "phases": sorted(set(phases)),
        "after": worker.progress["phase"],
        "step_s": result.step_time_s,
        "compute_s": result.compute_s,
    }


def failed_step(worker: Worker) -> dict[str, Any]:
    """One train step expected to fail: the name of what it raised (None: nothing), whether the worker took
    it for a failure of the framework's collectives, and the step the worker is at after it."""
    try:
        worker.train_step()
        raised = None
    except Exception as exc:
        raised = type(exc).__name__
    return {"raised": raised, "collective_failed": worker.collective_failed, "step": worker.step}
