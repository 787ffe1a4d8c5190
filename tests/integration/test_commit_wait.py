"""A sharded save whose commit the driver stops waiting for (``checkpoint.commit_wait_s``): a rank still
writing its shards — a stalled filesystem — holds up neither a recovery nor the next save, and the save is
abandoned for good: not committed when the rank's part comes in after all.

The rank is a small Ray actor standing in for a member's ``written()`` call (it answers when the test lets it
go, with a part); the driver's side — :class:`~trainer.cluster.saves.Saves`, its commit thread, the journal —
is the real one. The commit of the parts themselves is covered by the sharded checkpoint tests; here it is
only recorded, to see whether the commit thread goes on to it."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from trainer.cluster import saves as saves_module
from trainer.cluster.saves import Saves
from trainer.goodput import Goodput
from trainer.journal import Journal
from trainer.metrics import NullSink
from trainer.progress import Progress
from trainer.testing.configs import make_config
from trainer.testing.runs import events

pytestmark = pytest.mark.usefixtures("local_ray")


@ray.remote(num_cpus=0, max_concurrency=2)
class _Rank:
    """A rank writing its shards of a save until :meth:`let_go`; then its part is written."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def written(self, directory: str) -> dict[str, Any]:
        self.go.wait(120)
        return {"part": SimpleNamespace(files={})} if self.go.is_set() else {"failed": "timed out"}

    def let_go(self) -> None:
        self.go.set()


def _saves(tmp_path: Path, *extra: str) -> Saves:
    config = make_config("device=cpu", "train.parallelism=fsdp", "monitoring=off", *extra)
    journal = Journal(tmp_path / "journal.jsonl")
    return Saves(
        config, str(tmp_path / "checkpoints"), journal, NullSink(), Goodput(), Progress(10, 1, io.StringIO())
    )


def _pending(saves: Saves, rank: Any) -> Path:
    """A save of step 4 in flight, as ``Saves._save_shards`` leaves it: its commit thread waits for ``rank``."""
    store = saves._store()
    directory = store.begin(4)
    saves._gate = saves_module._Gate()
    written = [rank.written.remote(str(directory))]
    saves._pending = saves_module._in_background(
        saves_module._commit, store, directory, written, {"step": 4}, 1, saves._gate
    )
    saves._pending_step = 4
    return directory


def _commits(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def commit_parts(store: Any, directory: Path, parts: list[Any], header: Any, world_size: int) -> Path:
        calls.append(directory)
        final = directory.with_name(f"step_{header['step']:09d}")
        directory.rename(final)
        return final

    monkeypatch.setattr(saves_module, "commit_parts", commit_parts)
    return calls


def test_a_save_not_committed_in_time_is_abandoned_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = _commits(monkeypatch)
    saves = _saves(tmp_path, "checkpoint.commit_wait_s=1")
    rank = _Rank.remote()
    directory = _pending(saves, rank)
    why = saves.settle()  # what a recovery does before it restores: at most commit_wait_s
    assert why is not None and "step 4 was not committed within 1 s" in why
    [failed] = events(tmp_path, "checkpoint_failed")
    assert failed["step"] == 4 and "abandoned" in failed["error"]
    ray.get(rank.let_go.remote())  # the rank's part comes in after all: still not committed
    deadline = time.monotonic() + 30
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not directory.exists()  # removed by the commit thread, once the rank was done with it
    assert commits == []
    ray.kill(rank)


def test_a_save_committed_in_time_is_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commits = _commits(monkeypatch)
    saves = _saves(tmp_path, "checkpoint.commit_wait_s=60")
    rank = _Rank.remote()
    directory = _pending(saves, rank)
    ray.get(rank.let_go.remote())
    assert saves.settle() is None
    assert commits == [directory] and events(tmp_path, "checkpoint_failed") == []
    assert [p.name for p in saves._store().committed()] == ["step_000000004"]
    ray.kill(rank)
