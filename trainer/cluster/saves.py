"""The driver's side of a group run's checkpoints: rank 0 stages one (replicas hold the same state; sharded
state is gathered by every rank for it) and writes it in the background; this books what each background
write did and what the saves cost."""

from __future__ import annotations

import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import ray

from trainer.checkpoint.lease import Fence
from trainer.checkpoint.objects import scheme
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.goodput import Goodput
from trainer.journal import Journal
from trainer.metrics import MetricsSink
from trainer.progress import Progress


class Saves:
    def __init__(
        self,
        config: Config,
        checkpoint_root: str,
        journal: Journal,
        sink: MetricsSink,
        goodput: Goodput,
        progress: Progress,
    ) -> None:
        self.config, self.checkpoint_root = config, checkpoint_root
        self.journal, self.sink, self.goodput, self.progress = journal, sink, goodput, progress
        #: The step of the newest checkpoint staged (or restored); -1 before any.
        self.last_saved = -1
        #: The driver's lease fence, handed to the member that commits (None: no lease).
        self.fence: Fence | None = None

    def restore(self, members: list[Any]) -> int:
        """Every member restores the newest good checkpoint (damaged newer ones are skipped and reported);
        returns its step, 0 without one."""
        keep = self.config.checkpoint.keep_last
        restored = ray.get([m.restore.remote(str(self.checkpoint_root), keep) for m in members])
        if restored[0] is None:
            return 0
        self.last_saved = int(restored[0]["step"])
        for path, why in restored[0]["skipped"]:
            self.journal.record("checkpoint_skipped", path=path, reason=why)
            print(f"warning: skipped damaged checkpoint {path}: {why}")
        self.journal.record("resumed", **{k: v for k, v in restored[0].items() if k != "skipped"})
        print(f"resumed from {restored[0]['path']} at step {self.last_saved}")
        return self.last_saved

    def writers(self, members: list[Any], rank: int = 0) -> list[Any]:
        """Who takes part in a save of the group's state: the member of ``rank`` (replicas hold the same
        state), or with sharded state (``train.parallelism=fsdp``) every member, rank 0 writing."""
        return list(members) if self.config.train.sharded else [members[rank]]

    def save(self, writers: list[Any], step: int, metrics: dict[str, float] | None = None) -> None:
        """``writers`` (see :meth:`writers`) stage a checkpoint of ``step``; it commits in the background."""
        keep = self.config.checkpoint.keep_last
        started = time.monotonic()
        refs = [m.save.remote(str(self.checkpoint_root), keep, metrics, self.fence) for m in writers]
        reply = ray.get(refs)[0]
        self.goodput.bad("checkpoint", time.monotonic() - started)
        self.sink.checkpoint("save", reply["blocking_s"], reply["bytes"], step)
        self.committed(reply, step)
        self.last_saved = step
        self.journal.record("checkpoint_started", step=step, blocking_s=reply["blocking_s"])
        self.record_goodput()

    def finish(self, writers: list[Any], step: int) -> tuple[float, dict[str, Any]]:
        """The run's end: the held-out loss, the final checkpoint (unless ``step`` is saved already), committed;
        returns the loss and the goodput account."""
        eval_loss = self.evaluate(writers)
        if self.last_saved != step:
            self.save(writers, step, {"eval_loss": eval_loss})
        self.flush(writers[0], step)
        self.sink.eval_loss(eval_loss)
        return eval_loss, self.record_goodput()

    @staticmethod
    def evaluate(writers: list[Any]) -> float:
        """The held-out loss of the group's state, from ``writers`` (see :meth:`writers`): rank 0's answer."""
        return float(ray.get([m.evaluate.remote() for m in writers])[0])

    def final(self, writers: list[Any], step: int, timeout_s: float) -> tuple[int | None, str]:
        """Save ``step`` now (unless it is saved already) and wait for the commit, for at most ``timeout_s``:
        the step saved, or None and why not."""
        try:
            if self.last_saved != step:
                self.save(writers, step)
            self.flush(writers[0], step, timeout_s=max(timeout_s, 1.0))
        except (ray.exceptions.RayError, TimeoutError) as exc:
            return None, f"the save did not complete: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return step, ""

    def flush(self, member: Any, step: int, timeout_s: float | None = None) -> None:
        """Wait for ``member``'s background save and book its outcome."""
        self.committed(ray.get(member.flush.remote(), timeout=timeout_s), step)

    def committed(self, reply: dict[str, Any], step: int) -> None:
        """Journal the outcome of the previous background save (committed, or failed to write)."""
        if reply.get("failed"):
            self.journal.record("checkpoint_failed", error=reply["failed"], step=step)
            self.progress.message(f"error: {reply['failed']}")
        path = reply.get("committed")
        if path is not None:
            saved = int(PurePosixPath(path).name[5:14])
            self.journal.record("checkpoint_saved", path=path, step=saved)
            self.sink.checkpoint("commit", 0.0, int(reply.get("committed_bytes") or 0), saved)

    def record_goodput(self) -> dict[str, Any]:
        """Journal and export the goodput account so far (a re-launched driver continues from it)."""
        totals = self.goodput.snapshot()
        self.journal.record("goodput", **totals)
        self.sink.goodput(totals["ratio"], totals["badput_s"])
        return totals


def check_shared(checkpoint_root: str, actors: list[Any]) -> None:
    """Refuse a local ``checkpoint.dir`` that some worker cannot see: rank 0 would commit checkpoints to its
    own node's disk, which a worker on another node (or the run after that node is lost) cannot read.
    A marker written here must be visible from every worker's node (a shared filesystem); object storage
    needs no check."""
    if scheme(checkpoint_root) is not None:
        return
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".shared-check-{uuid.uuid4().hex[:8]}"
    marker.touch()
    try:
        seen = ray.get([a.sees.remote(str(marker)) for a in actors])
    finally:
        marker.unlink(missing_ok=True)
    blind = [i for i, ok in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(
            f"checkpoint.dir={checkpoint_root} is not shared with the nodes of {len(blind)} of {len(seen)} "
            "workers (a file written there by the driver is not visible to them), so checkpoints written by "
            "rank 0 would live on one node's disk only; allowed: a path on a filesystem every node mounts, or "
            "object storage (checkpoint.dir=s3://bucket/prefix)"
        )
