"""The driver's side of a group run's checkpoints, and what each save cost.

Replicated state (DDP): rank 0 stages a checkpoint (the replicas hold the same state) and writes and commits
it in the background. Sharded state (``train.parallelism=fsdp``): every rank stages its own shards and writes
them in the background into one private directory that the driver made (on object storage: uploads them
under a name the driver reserved); the driver collects every rank's part (files and digests) on a thread of
its own and commits the checkpoint once all are in — or abandons it, removing what was written, when a rank
was lost or failed to write before that (see :mod:`trainer.checkpoint.sharded`)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path, PurePosixPath
from typing import Any

from trainer.checkpoint.lease import Fence
from trainer.checkpoint.locations import scheme
from trainer.checkpoint.manager import open_store
from trainer.checkpoint.objects import ObjectStore
from trainer.checkpoint.sharded import commit_parts, commit_uploaded
from trainer.checkpoint.store import CheckpointStore
from trainer.cluster import calls
from trainer.config import Config
from trainer.devices import get_adapter
from trainer.errors import CheckpointWriteError, ConfigError
from trainer.goodput import Goodput
from trainer.journal import Journal
from trainer.lifecycle import (
    RestoreReport,
    record_committed,
    record_goodput,
    record_save_failed,
    record_staged,
    report_restore,
)
from trainer.metrics import MetricsSink
from trainer.progress import Progress

log = logging.getLogger(__name__)


def shards_per_rank(config: Config) -> bool:
    """Whether each rank writes its own shards (sharded state); else rank 0 writes the whole state."""
    return config.train.sharded


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
        #: Each rank writes its shards, the driver commits (see :func:`shards_per_rank`).
        self.per_rank = shards_per_rank(config)
        #: The sharded save being written and committed: its outcome (as a member's ``flush`` reports it).
        self._pending: Future[dict[str, Any]] | None = None
        self._pending_step = -1
        #: Whether the pending save is committed or given up on, whichever is decided first.
        self._gate = _Gate()

    def _store(self) -> CheckpointStore | ObjectStore:
        checkpoint = self.config.checkpoint
        store = open_store(self.checkpoint_root, checkpoint.keep_last, checkpoint.storage_options)
        store.fence = self.fence
        return store

    def restore(self, members: list[Any], family: str | None = None) -> int:
        """Every member (on ``family``, default the configured one) restores the newest good checkpoint
        (damaged newer ones are skipped and reported); returns its step, 0 without one."""
        keep = self.config.checkpoint.keep_last
        if self.per_rank:  # the members leave leftovers of interrupted saves to the driver
            for path in self._store().remove_partial():
                log.info("removed %s, the leftover of an interrupted save", path)
        restored = calls.get([m.restore.remote(str(self.checkpoint_root), keep) for m in members])
        if restored[0] is None:
            return 0
        report = RestoreReport.of(restored[0])
        self.last_saved = report.step
        report_restore(self.journal, report, family or get_adapter(self.config.device.family).name)
        return self.last_saved

    def writers(self, members: list[Any], rank: int = 0) -> list[Any]:
        """Who takes part in a save of the group's state: the member of ``rank`` (replicas hold the same
        state), or with sharded state (``train.parallelism=fsdp``) every member, each writing its shards."""
        return list(members) if self.config.train.sharded else [members[rank]]

    def save(self, writers: list[Any], step: int, metrics: dict[str, float] | None = None) -> None:
        """``writers`` (see :meth:`writers`) stage a checkpoint of ``step``; it commits in the background."""
        if self.per_rank:
            self._save_shards(writers, step, metrics)
            return
        keep = self.config.checkpoint.keep_last
        started = time.monotonic()
        refs = [m.save.remote(str(self.checkpoint_root), keep, metrics, self.fence) for m in writers]
        reply = calls.get(refs)[0]
        held = time.monotonic() - started
        self.committed(reply, self.last_saved)  # the outcome of the previous save (of that step)
        self.last_saved = step
        record_staged(self.journal, self.sink, self.goodput, step, held, reply["blocking_s"], reply["bytes"])

    def _save_shards(self, writers: list[Any], step: int, metrics: dict[str, float] | None) -> None:
        """Every rank stages its shards of ``step`` (the call returns after the copies) and writes them into
        a fresh private directory; a thread of the driver commits the checkpoint once every rank's part is
        in (:meth:`_commit`). The previous sharded save is settled first: commits never overlap."""
        self.settle()
        keep = self.config.checkpoint.keep_last
        store = self._store()
        try:  # the checkpoint's private directory; on object storage, its URL
            if isinstance(store, CheckpointStore):
                directory: Path | str = store.begin(step)
            else:
                directory = f"{store.url}/{store.reserve(step)}"
        except Exception as exc:  # the checkpoint directory cannot be written: training goes on without it
            self.committed({"failed": f"checkpoint of step {step}: cannot write to {store}: {exc}"}, step)
            return
        started = time.monotonic()
        staging = [m.save_shards.remote(self.checkpoint_root, keep, str(directory), metrics) for m in writers]
        calls.wait(staging, num_returns=len(staging))  # every rank staged its shards, or failed to
        # Asked even when a rank failed to stage: the commit thread then abandons the save, but only once every
        # rank still writing into the directory is done with it.
        written = [m.written.remote(str(directory)) for m in writers]
        answers = [_value(c) for c in staging]
        header = answers[0]["header"] if answers[0] is not None else None
        self._gate = _Gate()
        self._pending = _in_background(_commit, store, directory, written, header, len(writers), self._gate)
        self._pending_step = step
        # A rank's error reaches the caller as before (a lost worker: the policy decides).
        replies = calls.get(staging)
        held = time.monotonic() - started
        self.last_saved = step
        record_staged(
            self.journal,
            self.sink,
            self.goodput,
            step,
            held,
            max(r["blocking_s"] for r in replies),
            sum(int(r["bytes"]) for r in replies),
            blocking_s_per_rank=[r["blocking_s"] for r in replies],
        )

    def settle(self, timeout_s: float | None = None) -> str | None:
        """Wait (at most ``timeout_s``, default ``checkpoint.commit_wait_s``) for the sharded save in flight to
        be committed or abandoned, and book its outcome; nothing to do without one. Call before the group
        restores from the checkpoints, so that a save all ranks wrote is the one restored. A save still not
        committed then is abandoned: its commit thread removes it once the ranks are done with it, and never
        commits it. Returns None, or why the save was not committed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        wait = self.config.checkpoint.commit_wait_s if timeout_s is None else timeout_s
        try:
            outcome = pending.result(timeout=wait)
        except TimeoutError:
            if not self._gate.claim("abandon"):  # its commit had begun: it ends soon, either way
                return self.committed(pending.result(), self._pending_step)
            outcome = {
                "committed": None,
                "failed": f"the sharded checkpoint of step {self._pending_step} was not committed within "
                f"{wait:g} s (a rank still writing its shards) and is abandoned, nothing committed",
            }
        return self.committed(outcome, self._pending_step)

    def finish(self, writers: list[Any], step: int) -> tuple[float, dict[str, Any], str | None]:
        """The run's end: the held-out loss, the final checkpoint (unless ``step`` is saved already), committed;
        returns the loss, the goodput account, and None or why the final checkpoint was not committed."""
        eval_loss = self.evaluate(writers)
        if self.last_saved != step:
            self.save(writers, step, {"eval_loss": eval_loss})
        failed = self.flush(writers[0], step)
        return eval_loss, record_goodput(self.journal, self.sink, self.goodput), failed

    @staticmethod
    def evaluate(writers: list[Any]) -> float:
        """The held-out loss of the group's state, from ``writers`` (see :meth:`writers`): rank 0's answer."""
        return float(calls.get([m.evaluate.remote() for m in writers])[0])

    def final(self, writers: list[Any], step: int, timeout_s: float) -> tuple[int | None, str]:
        """Save ``step`` now (unless it is saved already) and wait for the commit, for at most ``timeout_s``:
        the step saved, or None and why not."""
        try:
            if self.last_saved != step:
                self.save(writers, step)
            failed = self.flush(writers[0], step, timeout_s=max(timeout_s, 1.0))
        except calls.call_errors() as exc:
            return None, f"the save did not complete: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        return (step, "") if failed is None else (None, f"the save did not complete: {failed}")

    def flush(self, member: Any, step: int, timeout_s: float | None = None) -> str | None:
        """Wait for ``member``'s background save (with sharded state: the driver's commit) and book its
        outcome: None, or why it was not committed."""
        if self.per_rank:
            return self.settle(timeout_s)
        return self.committed(calls.get(member.flush.remote(), timeout=timeout_s), step)

    def committed(self, reply: dict[str, Any], step: int) -> str | None:
        """Journal the outcome of the previous background save (committed, or failed to write); returns None,
        or why it failed."""
        failed = reply.get("failed")
        if failed:
            record_save_failed(self.journal, step, failed, say=self.progress.message)
        path = reply.get("committed")
        if path is not None:
            saved = int(PurePosixPath(path).name[5:14])
            record_committed(self.journal, self.sink, path, saved, int(reply.get("committed_bytes") or 0))
        return str(failed) if failed else None


def _in_background(fn: Callable[..., dict[str, Any]], *args: Any) -> Future[dict[str, Any]]:
    """``fn(*args)`` on a daemon thread (a commit still waiting for lost ranks never holds up the driver's
    exit); the future yields its result or raises its error."""
    future: Future[dict[str, Any]] = Future()

    def body() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=body, name="checkpoint-commit", daemon=True).start()
    return future


def _value(ref: Any) -> dict[str, Any] | None:
    """What the finished call ``ref`` returned; None when it raised (the rank was lost, a collective failed)."""
    try:
        return dict(calls.get(ref))
    except calls.call_errors():
        return None


class _Gate:
    """What becomes of a pending sharded save, decided once: its commit thread commits it, or the driver,
    tired of waiting, abandons it — whichever claims it first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decided: str | None = None

    def claim(self, decision: str) -> bool:
        """Decide ``decision`` unless the other one was decided first; whether ``decision`` stands."""
        with self._lock:
            if self._decided is None:
                self._decided = decision
            return self._decided == decision


def _commit(
    store: CheckpointStore | ObjectStore,
    directory: Path | str,
    written: list[Any],
    header: dict[str, Any] | None,
    world_size: int,
    gate: _Gate,
) -> dict[str, Any]:
    """On the driver's commit thread: wait for every rank's part of the sharded save in ``directory``, then
    commit it and delete checkpoints beyond ``keep_last``; a save that lost a rank (or one that could not be
    written, or that the driver stopped waiting for: ``gate``) is abandoned, its directory removed once no
    rank writes into it any more. Returns the outcome as a member's ``flush`` does: ``committed`` and
    ``committed_bytes``, or ``failed``."""
    calls.wait(written, num_returns=len(written))  # every rank done with the directory, or gone
    answers: list[dict[str, Any]] = []
    for rank, ref in enumerate(written):
        try:
            answers.append(calls.get(ref))
        except calls.call_errors() as exc:
            answers.append({"failed": f"rank {rank} was lost ({type(exc).__name__})"})
    failed = [a["failed"] for a in answers if "failed" in a]
    if not failed and not gate.claim("commit"):
        failed = ["the driver stopped waiting for it (checkpoint.commit_wait_s)"]
    if header is None and not failed:
        failed = ["rank 0 did not stage the checkpoint"]
    try:
        if failed:
            raise CheckpointWriteError("; ".join(failed))
        assert header is not None
        parts = [a["part"] for a in answers]
        if isinstance(store, CheckpointStore):
            final: Path | str = commit_parts(store, Path(directory), parts, header, world_size)
        else:
            final = commit_uploaded(store, store.name_of(directory), parts, header, world_size)
    except Exception as exc:  # any error of the commit (a full disk, a lost lease, …): nothing committed
        if isinstance(store, CheckpointStore):
            store.abandon(Path(directory))
        else:
            store.discard(store.name_of(directory))
        return {
            "committed": None,
            "failed": f"the sharded checkpoint of step {header['step'] if header else '?'} was abandoned, nothing "
            f"committed: {exc}",
        }
    try:
        store.retain(final)
    except Exception as exc:  # s3fs raises its own errors besides OSError
        log.warning("could not delete old checkpoints in %s: %s", store, exc)
    total = sum(f["bytes"] for a in answers for f in a["part"].files.values())
    return {"committed": str(final), "committed_bytes": total, "failed": None}


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
        seen = calls.get([a.sees.remote(str(marker)) for a in actors])
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
