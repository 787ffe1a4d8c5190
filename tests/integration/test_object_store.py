"""Checkpoints on object storage (``checkpoint.dir=s3://…``) keep the disk's guarantees, against a real
S3-compatible server (moto's standalone server on 127.0.0.1, its own process; no mock of the client):
committed only when complete, ``latest``, retention, never overwritten, damaged ones skipped, an upload
killed mid-way invisible, credentials never stored, and the driver's lease taken with conditional writes."""

import json
import subprocess
import sys
from typing import Any

import pytest

from trainer.checkpoint import CheckpointManager
from trainer.testing.configs import TINY_CPU, make_config
from trainer.testing.s3 import SECRET_KEY, bucket_objects, client, options_overrides
from trainer.testing.state import live_state, mismatched, trained_worker

TINY = TINY_CPU

S3Run = tuple[str, dict[str, str], str]


def test_saved_on_s3_restores_bit_for_bit_and_latest_names_the_newest(
    s3_run: S3Run, s3_endpoint: str
) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, keep_last=3, storage_options=options)
    worker = trained_worker(make_config(*TINY), 2)
    first = worker.save(manager)
    worker.train_step()
    second = worker.save(manager)
    assert (first, second) == (f"{url}/step_000000002", f"{url}/step_000000003")
    assert manager.store.committed() == [first, second]
    assert manager.store.latest_pointer() == second

    fresh = trained_worker(make_config(*TINY))
    restored = fresh.restore(CheckpointManager(url, storage_options=options))
    assert restored is not None and restored.path == second and restored.skipped == []
    assert mismatched(live_state(worker), live_state(fresh)) == []
    objects = bucket_objects(s3_endpoint, bucket)
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
    ref = str(trained_worker(make_config(*TINY), 1).save(CheckpointManager(url, storage_options=options)))
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
    worker = trained_worker(make_config(*TINY, *options_overrides(url, options)))
    worker.train_step()
    worker.save(CheckpointManager(url, storage_options=options))
    objects = bucket_objects(s3_endpoint, bucket)
    assert not [k for k, body in objects.items() if SECRET_KEY.encode() in body]
    manifest = json.loads(objects["run/step_000000001/manifest.json"])
    stored = manifest["config"]["checkpoint"]["storage_options"]
    assert stored == {"endpoint_url": s3_endpoint, "key": "<redacted>", "secret": "<redacted>"}


def test_retention_deletes_whole_checkpoints_and_a_second_save_of_a_step_overwrites_nothing(
    s3_run: S3Run, s3_endpoint: str
) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, keep_last=2, storage_options=options)
    worker = trained_worker(make_config(*TINY), 1)
    worker.save(manager)
    before = bucket_objects(s3_endpoint, bucket)
    again = worker.save(manager)  # the same step: a new name, the first untouched
    assert again == f"{url}/step_000000001.1"
    after = bucket_objects(s3_endpoint, bucket)
    assert {k: v for k, v in after.items() if k in before and k != "run/latest"} == {
        k: v for k, v in before.items() if k != "run/latest"
    }
    worker.train_step()
    worker.save(manager)
    assert manager.store.committed() == [again, f"{url}/step_000000002"]
    assert not [k for k in bucket_objects(s3_endpoint, bucket) if k.startswith("run/step_000000001/")]


def test_a_damaged_newest_checkpoint_is_skipped_naming_its_url(s3_run: S3Run, s3_endpoint: str) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, storage_options=options)
    worker = trained_worker(make_config(*TINY), 1)
    worker.save(manager)
    older = live_state(worker)
    worker.train_step()
    worker.save(manager)
    s3 = client(s3_endpoint)
    key = "run/step_000000002/__0_0.distcp"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x10  # one flipped bit in the middle of the tensor data
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    fresh = trained_worker(make_config(*TINY))
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
    worker = trained_worker(make_config(*TINY), 1)
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
    restored = trained_worker(make_config(*TINY)).restore(CheckpointManager(url, storage_options=options))
    assert restored is not None and restored.path == f"{url}/step_000000001"
    [(ref, why)] = restored.skipped
    assert ref == f"{url}/step_000000002" and named in why


def test_a_dangling_latest_on_s3_falls_back_to_scanning(s3_run: S3Run, s3_endpoint: str) -> None:
    url, options, bucket = s3_run
    manager = CheckpointManager(url, storage_options=options)
    worker = trained_worker(make_config(*TINY), 1)
    worker.save(manager)
    client(s3_endpoint).put_object(Bucket=bucket, Key="run/latest", Body=b"step_000000099\n")
    assert manager.store.latest_pointer() is None
    restored = trained_worker(make_config(*TINY)).restore(CheckpointManager(url, storage_options=options))
    assert restored is not None and restored.path == f"{url}/step_000000001"


KILLED_MID_UPLOAD = """
import os, signal, sys
from trainer.checkpoint import CheckpointManager
from trainer.testing.configs import TINY_CPU, make_config
from trainer.testing.state import trained_worker
url, endpoint, key, secret = sys.argv[1:5]
manager = CheckpointManager(url, storage_options={"endpoint_url": endpoint, "key": key, "secret": secret})
worker = trained_worker(make_config(*sys.argv[5:]), steps=1)
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
    keys = set(bucket_objects(s3_endpoint, bucket))
    assert "run/step_000000002/__0_0.distcp" in keys and "run/step_000000002/manifest.json" not in keys
    manager = CheckpointManager(url, storage_options=options)
    assert manager.store.committed() == [f"{url}/step_000000001"]
    assert manager.store.latest_pointer() == f"{url}/step_000000001"

    restored = trained_worker(make_config(*TINY)).restore(
        manager
    )  # a new start also clears the half upload away
    assert restored is not None and restored.manifest.step == 1
    assert not [k for k in bucket_objects(s3_endpoint, bucket) if k.startswith("run/step_000000002")]
