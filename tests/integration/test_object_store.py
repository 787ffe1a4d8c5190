"""Checkpoints on object storage (``checkpoint.dir=s3://…``) keep the disk's guarantees, against a real
S3-compatible server (moto's standalone server on 127.0.0.1, its own process; no mock of the client):
committed only when complete, ``latest``, retention, never overwritten, damaged ones skipped, an upload
killed mid-way invisible, credentials never stored, and the driver's lease taken with conditional writes."""

from __future__ import annotations

import json
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
from trainer.testing.s3 import SECRET_KEY, client
from trainer.testing.state import live_state, mismatched
from trainer.worker import Worker

TINY = TINY_CPU

S3Run = tuple[str, dict[str, str], str]


def _worker(*overrides: str) -> Worker:
    worker = Worker(make_config(*TINY, *overrides))
    worker.setup()
    worker.attach(0, 1)
    return worker


def _trained(steps: int) -> Worker:
    worker = _worker()
    for _ in range(steps):
        worker.train_step()
    return worker


def _objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = client(endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _options_overrides(url: str, options: dict[str, str]) -> tuple[str, ...]:
    return (f"checkpoint.dir={url}", *(f"+checkpoint.storage_options.{k}={v}" for k, v in options.items()))


def test_saved_on_s3_restores_bit_for_bit_and_latest_names_the_newest(
    s3_run: S3Run, s3_endpoint: str
) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, keep_last=3, storage_options=options)
    worker = _trained(2)
    first = worker.save(manager)
    worker.train_step()
    second = worker.save(manager)
    assert (first, second) == (f"{url}/step_000000002", f"{url}/step_000000003")
    assert manager.store.committed() == [first, second]
    assert manager.store.latest_pointer() == second

    fresh = _worker()
    restored = fresh.restore(CheckpointManager(url, storage_options=options))
    assert restored is not None and restored.path == second and restored.skipped == []
    assert mismatched(live_state(worker), live_state(fresh)) == []
    objects = _objects(s3_endpoint, bucket)
    manifest = json.loads(objects["run/step_000000003/manifest.json"])
    assert set(manifest["files"]) == {
        k.removeprefix("run/step_000000003/") for k in objects if k.startswith("run/step_000000003/")
    } - {"manifest.json"}


OPEN_AND_TELL = """
import sys
from trainer.checkpoint import CheckpointManager
url, ref, endpoint, key, secret = sys.argv[1:6]
store = CheckpointManager(url, storage_options={"endpoint_url": endpoint, "key": key, "secret": secret}).store
with store.opened(ref) as local:
    store.verify(local)
    print(local, (local / "manifest.json").stat().st_ino)
"""


def test_the_processes_of_one_host_opening_a_checkpoint_at_once_download_it_once(
    s3_run: S3Run, s3_endpoint: str
) -> None:
    """As the ranks of a group restoring: while one process holds the checkpoint open, another process of
    the host gets the same local copy (the same files), not a download of its own; the copy is removed when
    the last one leaves."""
    url, options, _ = s3_run
    ref = str(_trained(1).save(CheckpointManager(url, storage_options=options)))
    store = CheckpointManager(url, storage_options=options).store
    with store.opened(ref) as local:
        other = subprocess.run(
            [sys.executable, "-c", OPEN_AND_TELL, url, ref, s3_endpoint, options["key"], options["secret"]],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert other.returncode == 0, other.stderr[-2000:]
        assert other.stdout.split() == [str(local), str((local / "manifest.json").stat().st_ino)]
        assert store.verify(local).step == 1, "still whole after the other process left"
    assert not local.exists()


def test_credentials_never_reach_the_bucket(s3_run: S3Run, s3_endpoint: str) -> None:
    url, options, bucket = s3_run
    worker = _worker(*_options_overrides(url, options))
    worker.train_step()
    worker.save(CheckpointManager(url, storage_options=options))
    objects = _objects(s3_endpoint, bucket)
    assert not [k for k, body in objects.items() if SECRET_KEY.encode() in body]
    manifest = json.loads(objects["run/step_000000001/manifest.json"])
    stored = manifest["config"]["checkpoint"]["storage_options"]
    assert stored == {"endpoint_url": s3_endpoint, "key": "<redacted>", "secret": "<redacted>"}


def test_retention_deletes_whole_checkpoints_and_a_second_save_of_a_step_overwrites_nothing(
    s3_run: S3Run, s3_endpoint: str
) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, keep_last=2, storage_options=options)
    worker = _trained(1)
    worker.save(manager)
    before = _objects(s3_endpoint, bucket)
    again = worker.save(manager)  # the same step: a new name, the first untouched
    assert again == f"{url}/step_000000001.1"
    after = _objects(s3_endpoint, bucket)
    assert {k: v for k, v in after.items() if k in before and k != "run/latest"} == {
        k: v for k, v in before.items() if k != "run/latest"
    }
    worker.train_step()
    worker.save(manager)
    assert manager.store.committed() == [again, f"{url}/step_000000002"]
    assert not [k for k in _objects(s3_endpoint, bucket) if k.startswith("run/step_000000001/")]


def test_a_damaged_newest_checkpoint_is_skipped_naming_its_url(s3_run: S3Run, s3_endpoint: str) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, storage_options=options)
    worker = _trained(1)
    worker.save(manager)
    older = live_state(worker)
    worker.train_step()
    worker.save(manager)
    s3 = client(s3_endpoint)
    key = "run/step_000000002/__0_0.distcp"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x10  # one flipped bit in the middle of the tensor data
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    fresh = _worker()
    restored = fresh.restore(CheckpointManager(url, storage_options=options))
    assert restored is not None and restored.path == f"{url}/step_000000001"
    assert [ref for ref, _ in restored.skipped] == [f"{url}/step_000000002"]
    assert f"{url}/step_000000002" in restored.skipped[0][1] and "__0_0.distcp" in restored.skipped[0][1]
    assert mismatched(older, live_state(fresh)) == []


def _truncate(body: bytes) -> bytes | None:
    return body[: len(body) // 2]


def _edit_manifest(body: bytes) -> bytes | None:
    manifest = json.loads(body)
    manifest["step"] = 1  # as if hand-edited: its own digest no longer matches
    return json.dumps(manifest).encode()


@pytest.mark.parametrize(
    ("key", "damage", "named"),
    [
        ("__0_0.distcp", _truncate, "__0_0.distcp"),
        (".metadata", lambda body: None, ".metadata"),  # the object is missing
        ("manifest.json", _edit_manifest, "manifest"),
        ("rng/rank_00000.json", lambda body: body.replace(b"1", b"2", 1), "rng/rank_00000.json"),
    ],
)
def test_every_kind_of_damage_on_s3_is_found_and_the_older_checkpoint_used(
    key: str, damage: Any, named: str, s3_run: S3Run, s3_endpoint: str
) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, storage_options=options)
    worker = _trained(1)
    worker.save(manager)
    worker.train_step()
    worker.save(manager)
    s3 = client(s3_endpoint)
    full_key = f"run/step_000000002/{key}"
    changed = damage(s3.get_object(Bucket=bucket, Key=full_key)["Body"].read())
    if changed is None:
        s3.delete_object(Bucket=bucket, Key=full_key)
    else:
        s3.put_object(Bucket=bucket, Key=full_key, Body=changed)
    restored = _worker().restore(CheckpointManager(url, storage_options=options))
    assert restored is not None and restored.path == f"{url}/step_000000001"
    [(ref, why)] = restored.skipped
    assert ref == f"{url}/step_000000002" and named in why


def test_a_dangling_latest_on_s3_falls_back_to_scanning(s3_run: S3Run, s3_endpoint: str) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, storage_options=options)
    worker = _trained(1)
    worker.save(manager)
    client(s3_endpoint).put_object(Bucket=bucket, Key="run/latest", Body=b"step_000000099\n")
    assert manager.store.latest_pointer() is None
    restored = _worker().restore(CheckpointManager(url, storage_options=options))
    assert restored is not None and restored.path == f"{url}/step_000000001"


KILLED_MID_UPLOAD = """
import os, signal, sys
from trainer.checkpoint import CheckpointManager
from trainer.testing.configs import TINY_CPU, make_config
from trainer.worker import Worker
url, endpoint, key, secret = sys.argv[1:5]
manager = CheckpointManager(url, storage_options={"endpoint_url": endpoint, "key": key, "secret": secret})
worker = Worker(make_config(*sys.argv[5:]))
worker.setup()
worker.attach(0, 1)
worker.train_step()
worker.save(manager)
worker.train_step()
fs = manager.store.fs
put = fs.put

def put_then_die(sources, targets, **kwargs):  # the data objects go up, then the process is killed
    put(sources, targets, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

fs.put = put_then_die
worker.save(manager)
"""


def test_an_upload_killed_mid_way_leaves_no_visible_checkpoint_and_the_previous_intact(
    s3_run: S3Run, s3_endpoint: str
) -> None:
    url, options, bucket = s3_run
    child = subprocess.run(
        [sys.executable, "-c", KILLED_MID_UPLOAD, url, s3_endpoint, options["key"], options["secret"], *TINY],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == -9, child.stderr[-2000:]
    keys = set(_objects(s3_endpoint, bucket))
    assert "run/step_000000002/__0_0.distcp" in keys and "run/step_000000002/manifest.json" not in keys
    manager = CheckpointManager(url, storage_options=options)
    assert manager.store.committed() == [f"{url}/step_000000001"]
    assert manager.store.latest_pointer() == f"{url}/step_000000001"

    restored = _worker().restore(manager)  # a new start also clears the half upload away
    assert restored is not None and restored.manifest.step == 1
    assert not [k for k in _objects(s3_endpoint, bucket) if k.startswith("run/step_000000002")]


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
        worker = _trained(1)
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
    worker = _trained(1)
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
        restored = _worker().restore(b, clean=False)
        assert restored is not None and restored.manifest.step == 1
        b_saved = _trained(2).save(b)
    finally:
        resume.set()
        saving.join(timeout=120)
    [refused] = outcome
    assert isinstance(refused, CheckpointWriteError) and refused_by in str(refused), refused

    assert b.store.committed() == [f"{url}/step_000000001", b_saved]
    assert b.store.latest_pointer() == b_saved
    restored = _worker().restore(b)  # B's next start: the leftovers of A's save are removed
    assert restored is not None and restored.path == b_saved and restored.skipped == []
    with b.store.opened(b_saved) as local:
        assert b.store.verify(local).lease_generation == 2
    names = {k.split("/")[1] for k in _objects(s3_endpoint, bucket) if k.count("/") > 1}
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
    overrides = (*TINY, *_options_overrides(url, options), "checkpoint.interval_steps=3")
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
        run(make_config(*TINY, *_options_overrides(url, options), "train.steps=2"), run_dir=tmp_path)
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
                run(make_config(*TINY, *_options_overrides("s3://guarded/run", options)), run_dir=tmp_path)
        writer = {
            "endpoint_url": endpoint,
            **keys["writer"],
        }  # the same run with rights to write goes through
        assert (
            run(
                make_config(*TINY, *_options_overrides("s3://guarded/run", writer), "train.steps=2"),
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
    worker = _trained(1)
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
