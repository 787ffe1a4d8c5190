"""Object storage under whole runs and two drivers, against the same real S3-compatible server (moto's, on
127.0.0.1): the driver's lease taken and renewed with conditional writes, a driver paused through a take-over
unable to commit, a run that checkpoints to a bucket and a second that resumes from it, bad storage settings
refused before training, and export from a bucket."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.lease import Lease, LeaseHeldError
from trainer.errors import CheckpointWriteError, ConfigError, ExitCode
from trainer.job import run
from trainer.testing.configs import TINY_CPU, make_config
from trainer.testing.runs import events
from trainer.testing.s3 import SECRET_KEY, bucket_objects, client, options_overrides
from trainer.testing.state import trained_worker

TINY = TINY_CPU

S3Run = tuple[str, dict[str, str], str]


def test_one_driver_per_run_on_s3_with_conditional_writes(s3_run: S3Run) -> None:
    url, options, _ = s3_run
    store = CheckpointManager(url, storage_options=options).store
    holder = Lease(store.lease_slot(), stale_after_s=30, renew_s=0.2).acquire()
    try:
        with pytest.raises(LeaseHeldError, match=r"in use by another driver: pid \d+ .*generation 1"):
            Lease(store.lease_slot(), stale_after_s=30).acquire()
        time.sleep(0.5)  # renewals are conditional writes on the holder's own ETag: they keep succeeding
        assert not holder.lost.is_set()
    finally:
        holder._stop.set()  # the holder "pauses": it stops renewing without releasing

    # Two drivers find the lease stale at the same moment: If-Match lets exactly one take it over.
    racers = [Lease(store.lease_slot(), stale_after_s=0.1, renew_s=60) for _ in range(4)]
    time.sleep(0.2)
    outcomes: list[Any] = [None] * len(racers)

    def take(i: int) -> None:
        try:
            outcomes[i] = racers[i].acquire()
        except LeaseHeldError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(racers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if isinstance(o, Lease)]
    assert len(winners) == 1, outcomes
    assert winners[0].generation == 2 and winners[0].taken_from is not None
    try:
        worker = trained_worker(make_config(*TINY), 1)
        paused = CheckpointManager(url, storage_options=options)
        paused.store.fence = holder.fence  # the paused driver comes back and tries to commit
        with pytest.raises(CheckpointWriteError, match="taken over"):
            worker.save(paused)
        assert paused.store.committed() == []
        current = CheckpointManager(url, storage_options=options)
        current.store.fence = winners[0].fence
        worker.save(current)
        with current.store.opened(f"{url}/step_000000001") as local:
            assert current.store.verify(local).lease_generation == 2  # committed under the winner's
    finally:
        for lease in winners:
            lease.release()
    assert not store.lease_slot().exists()


@pytest.mark.parametrize(
    ("pause", "refused_by"),
    [
        ("before its upload", "uploaded under this name meanwhile"),
        ("after its manifest went up", "lease generation 2"),
        ("after it read latest", "lease generation 2"),
    ],
)
def test_a_driver_paused_through_a_take_over_cannot_commit_on_s3(
    pause: str, refused_by: str, s3_run: S3Run, s3_endpoint: str
) -> None:
    """Driver A holds the lease, has committed step 1 and is saving step 2 when it is paused past its lease
    check: before uploading, with the manifest of step 2 up, or inside the commit, having read ``latest``.
    Its lease goes stale, B takes it over and claims ``latest`` as a driver does at its start, restores
    step 1 (nothing of A's step 2 is visible) and commits a step 2 of its own. When A comes back its save is
    refused — by the create-only upload (B took the same name), or by ``latest`` — and nothing of it is
    listed or restored; B's checkpoint is intact, under generation 2."""
    url, options, bucket = s3_run
    slot = CheckpointManager(url, storage_options=options).store.lease_slot()
    a_lease = Lease(slot, stale_after_s=30, renew_s=600).acquire()
    a = CheckpointManager(url, storage_options=options)
    a.store.fence = a_lease.fence
    a.store.claim(a_lease.fence)
    worker = trained_worker(make_config(*TINY), 1)
    worker.save(a)
    worker.train_step()

    paused, resume = threading.Event(), threading.Event()

    def hold() -> None:
        if not paused.is_set():
            paused.set()
            assert resume.wait(120)

    store, pointer = a.store, a.store.pointer
    if pause == "before its upload":
        upload = store.upload
        store.upload = lambda *args: (hold(), upload(*args))[1]  # type: ignore[method-assign]
    elif pause == "after its manifest went up":
        advance = pointer.advance
        pointer.advance = lambda *args: (hold(), advance(*args))[1]  # type: ignore[method-assign]
    else:
        read = pointer.read
        pointer.read = lambda: (read(), hold())[0]  # type: ignore[method-assign]
    outcome: list[Any] = []
    saving = threading.Thread(target=lambda: outcome.append(_outcome(worker.save, a)))
    saving.start()
    try:
        assert paused.wait(120), "A never reached the pause"
        time.sleep(0.2)  # A has stopped renewing: its lease is stale for B
        b_lease = Lease(slot, stale_after_s=0.1, renew_s=600).acquire()
        assert b_lease.generation == 2
        b = CheckpointManager(url, storage_options=options)
        b.store.fence = b_lease.fence
        b.store.claim(b_lease.fence)
        assert b.store.committed() == [f"{url}/step_000000001"], "a manifest not in latest is not committed"
        restored = trained_worker(make_config(*TINY)).restore(b, clean=False)
        assert restored is not None and restored.manifest.step == 1
        b_saved = trained_worker(make_config(*TINY), 2).save(b)
    finally:
        resume.set()
        saving.join(timeout=120)
    [refused] = outcome
    assert isinstance(refused, CheckpointWriteError) and refused_by in str(refused), refused

    assert b.store.committed() == [f"{url}/step_000000001", b_saved]
    assert b.store.latest_pointer() == b_saved
    restored = trained_worker(make_config(*TINY)).restore(
        b
    )  # B's next start: the leftovers of A's save are removed
    assert restored is not None and restored.path == b_saved and restored.skipped == []
    with b.store.opened(b_saved) as local:
        assert b.store.verify(local).lease_generation == 2
    names = {k.split("/")[1] for k in bucket_objects(s3_endpoint, bucket) if k.count("/") > 1}
    assert names == {"step_000000001", b.store.name_of(b_saved)}
    b_lease.release()
    a_lease.release()  # no longer A's: left in place until B's release above removed it


def _outcome(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except Exception as exc:
        return exc


def test_a_run_checkpoints_to_s3_and_a_second_run_resumes_from_it(s3_run: S3Run, tmp_path: Path) -> None:
    url, options, _ = s3_run
    overrides = (*TINY, *options_overrides(url, options), "checkpoint.interval_steps=3")
    assert run(make_config(*overrides, "train.steps=6"), run_dir=tmp_path / "first") == ExitCode.FINISHED
    assert run(make_config(*overrides, "train.steps=9"), run_dir=tmp_path / "second") == ExitCode.FINISHED
    (resumed,) = events(tmp_path / "second", "resumed")
    assert resumed["path"] == f"{url}/step_000000006" and resumed["step"] == 6
    saved = [e["path"] for e in events(tmp_path / "second", "checkpoint_saved")]
    assert saved[-1] == f"{url}/step_000000009"
    journal = (tmp_path / "first" / "journal.jsonl").read_text() + (
        tmp_path / "second" / "journal.jsonl"
    ).read_text()
    assert SECRET_KEY not in journal


@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("missing-bucket", r"bucket .* does not exist"),
        ("closed-port", r"unreachable|Could not connect|connect"),
    ],
)
def test_bad_object_storage_fails_before_training_naming_the_key(
    where: str, cause: str, s3_endpoint: str, tmp_path: Path
) -> None:
    from trainer.testing.s3 import free_port, storage_options

    if where == "missing-bucket":
        url, options = "s3://no-such-bucket-here/run", storage_options(s3_endpoint)
    else:
        url, options = "s3://any/run", storage_options(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=rf"checkpoint.dir {url}.*{cause}"):
        run(make_config(*TINY, *options_overrides(url, options), "train.steps=2"), run_dir=tmp_path)
    assert events(tmp_path, "run_started") == []


def test_refused_credentials_and_a_read_only_bucket_fail_before_training(tmp_path: Path) -> None:
    """A server that checks signatures and IAM policies: a wrong secret, and a user who may only read."""
    from trainer.testing.s3 import SETUP_ACTIONS, s3_server, users_with_keys

    with s3_server(unauthenticated_actions=SETUP_ACTIONS) as endpoint:
        keys = users_with_keys(endpoint, "guarded")
        wrong = {"endpoint_url": endpoint, "key": keys["writer"]["key"], "secret": "not-the-secret"}
        reader = {"endpoint_url": endpoint, **keys["reader"]}
        for options, cause in [
            (wrong, "the credentials are refused"),
            (reader, "read-only for these credentials"),
        ]:
            with pytest.raises(ConfigError, match=rf"checkpoint.dir s3://guarded/run: {cause}"):
                run(make_config(*TINY, *options_overrides("s3://guarded/run", options)), run_dir=tmp_path)
        writer = {
            "endpoint_url": endpoint,
            **keys["writer"],
        }  # the same run with rights to write goes through
        assert (
            run(
                make_config(*TINY, *options_overrides("s3://guarded/run", writer), "train.steps=2"),
                run_dir=tmp_path,
            )
            == ExitCode.FINISHED
        )
        assert "not-the-secret" not in (tmp_path / "journal.jsonl").read_text()


def test_an_unsupported_scheme_is_refused_naming_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint.dir='gs://b/p'.*allowed: .*s3://bucket/prefix"):
        make_config(*TINY, "checkpoint.dir=gs://b/p")
    with pytest.raises(ConfigError, match=r"checkpoint.dir='s3:///p' names no bucket"):
        make_config(*TINY, "checkpoint.dir=s3:///p")


def test_a_checkpoint_on_s3_exports_to_a_plain_torch_file_passing_over_a_damaged_one(
    s3_run: S3Run, s3_endpoint: str, tmp_path: Path
) -> None:
    """``python -m trainer.export s3://…`` (its own process, the run's storage options on the command line):
    the newest checkpoint that verifies, downloaded and checked; a damaged newer one named and passed over;
    one damaged checkpoint named by its URL is refused."""
    url, options, bucket = s3_run
    manager = CheckpointManager(url, storage_options=options)
    worker = trained_worker(make_config(*TINY), 1)
    worker.save(manager)
    older = {k: v.clone() for k, v in worker.module.state_dict().items()}
    worker.train_step()
    worker.save(manager)
    s3 = client(s3_endpoint)
    key = "run/step_000000002/__0_0.distcp"
    s3.put_object(Bucket=bucket, Key=key, Body=s3.get_object(Bucket=bucket, Key=key)["Body"].read()[:100])
    flags = [f"--storage-option={k}={v}" for k, v in options.items()]

    def export(source: str, out: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "trainer.export", source, str(out), *flags]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    done = export(url, tmp_path / "model.pt")
    assert done.returncode == ExitCode.FINISHED, done.stderr
    assert f"{url}/step_000000002" in done.stderr and f"{url}/step_000000001 (step 1)" in done.stdout
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(exported) == set(older) and all(torch.equal(exported[k], older[k]) for k in older)

    refused = export(f"{url}/step_000000002", tmp_path / "newest.pt")
    assert refused.returncode == ExitCode.FAILED and f"{url}/step_000000002" in refused.stderr
    assert not (tmp_path / "newest.pt").exists()
    missing = export(f"{url}/step_000000007", tmp_path / "missing.pt")
    assert missing.returncode == ExitCode.CONFIG_ERROR and "not a committed checkpoint" in missing.stderr
