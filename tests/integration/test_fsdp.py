"""Sharded state (``train.parallelism=fsdp``, torch's ``fully_shard``) on a real local Ray with gloo: a lost
worker's run finishes equal to an uninterrupted one; every rank writes its own shards and the driver
commits one checkpoint listing them all; a save that loses a rank before its commit is abandoned; a sharded
run's checkpoint resumes on another world size (and on one process, and through the export command) with
the update of one process over the same samples, passing over a checkpoint with a damaged shard."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from trainer.checkpoint.store import CheckpointStore
from trainer.cluster.shard_copies import KeptShardCopies
from trainer.errors import ExitCode
from trainer.export import main as export_main
from trainer.job import run
from trainer.testing.configs import make_config
from trainer.testing.runs import events
from trainer.testing.s3 import client
from trainer.testing.state import mismatched, restored_state

pytestmark = pytest.mark.usefixtures("local_ray")

JOB = (
    "device=sim_npu",
    "model.n_layer=2",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=12",
    "train.steps=16",
    "checkpoint.interval_steps=4",
    "probes.preflight=false",
    "monitoring=off",
)


def _group(workers: int, *extra: str) -> tuple[str, ...]:
    return (
        "cluster=ray_local",
        f"cluster.workers={workers}",
        "cluster.cpus_per_worker=0.25",
        "train.parallelism=fsdp",
        *JOB,
        *extra,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final state of an uninterrupted 3-rank FSDP run."""
    clean = make_config(*_group(3))
    run_dir = tmp_path_factory.mktemp("clean")
    assert run(clean, run_dir=run_dir) == ExitCode.FINISHED
    return restored_state(clean, run_dir / "checkpoints")


# Suite time (about 22 s): the default suite restores a sharded group from disk in the abandoned-save test
# below (copies off) and goes on from the copies after a kill in the next test, bit for bit.
@pytest.mark.slow
def test_a_killed_fsdp_worker_is_replaced_and_the_run_matches_an_uninterrupted_one(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """Rank 1 of 3 SIGKILLed before step 7, with no shard copies kept: its shards are gone with it, so the
    group resumes from the checkpoint of step 4 (no member holds the state whole), repeats steps 5-6, and
    ends bit for bit where the uninterrupted run ends (same world size, same order of every reduction)."""
    clean = make_config(*_group(3))
    no_copies = "fault_tolerance.shard_copy_interval_steps=0"
    killed = make_config(*_group(3, no_copies, "faults.kill_rank=1", "faults.kill_at_step=7"))
    assert run(killed, run_dir=tmp_path / "killed") == ExitCode.FINISHED

    [failure] = events(tmp_path / "killed", "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    [recovered] = events(tmp_path / "killed", "recovered")
    assert recovered["state_from"] == "disk checkpoint" and recovered["step"] == 4
    assert "no shard copies are kept" in recovered["state_reason"]
    assert events(tmp_path / "killed", "shard_copies") == []
    b = restored_state(clean, tmp_path / "killed" / "checkpoints")
    assert int(uninterrupted["step"]) == int(b["step"]) == 16
    assert mismatched(uninterrupted, b) == []
    # Each rank wrote its own shards; one manifest lists every rank's files with their digests.
    store = CheckpointStore(tmp_path / "killed" / "checkpoints")
    manifest = store.verify(store.committed()[-1])
    assert {n.split("_")[2] for n in manifest.files if n.endswith(".distcp")} == {"0", "1", "2"}
    assert {n for n in manifest.files if n.startswith("rng/")} == {f"rng/rank_0000{r}.json" for r in range(3)}


def test_a_killed_fsdp_worker_goes_on_from_the_shard_copies_without_the_disk(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """Chunks of 2 steps, every rank's copy of its shards refreshed at each chunk end: rank 1 of 3 SIGKILLed
    before step 7 is replaced, every rank loads its own copy of step 6 — two steps after the newest
    checkpoint (step 4), so not from the disk — and the run ends bit for bit where the uninterrupted run
    ends. (A copy loaded into the wrong rank, or missing any part of a rank's state, breaks the equality.)"""
    clean = make_config(*_group(3))
    killed = make_config(*_group(3, "cluster.chunk_steps=2", "faults.kill_rank=1", "faults.kill_at_step=7"))
    assert killed.fault_tolerance.shard_copy_interval_steps == 1  # on by default under FSDP
    assert run(killed, run_dir=tmp_path / "killed") == ExitCode.FINISHED

    [failure] = events(tmp_path / "killed", "failure")
    assert failure["kind"] == "worker_lost" and failure["ranks"] == [1]
    copies = [e for e in events(tmp_path / "killed", "shard_copies") if e["step"] < 7]
    assert [e["step"] for e in copies] == [2, 4, 6] and all(e["bytes"] > 0 for e in copies)
    [recovered] = events(tmp_path / "killed", "recovered")
    assert recovered["state_from"] == "shard copies at step 6" and recovered["step"] == 6
    assert recovered["loaded_ranks"] == [0, 1, 2] and recovered["replaced_ranks"] == [1]
    saved = {e["step"] for e in events(tmp_path / "killed", "checkpoint_saved")}
    assert 4 in saved and 6 not in saved  # no checkpoint holds step 6: the disk could not have given it
    b = restored_state(clean, tmp_path / "killed" / "checkpoints")
    assert int(b["step"]) == 16
    assert mismatched(uninterrupted, b) == []


@ray.remote(num_cpus=0)
class _Holder:
    """Owns an object, then dies: what a copy whose node is lost looks like to whoever resolves it."""

    def hold(self) -> list[Any]:
        return [ray.put(torch.zeros(1 << 16))]  # nested: owned by this actor, not by its caller


@pytest.mark.slow  # about 40-60 s; the copies' own path runs in the default suite above
def test_a_lost_shard_copy_falls_back_to_the_disk_and_the_run_still_matches(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but rank 2's copy is lost when the repair needs it (its owner gone, as a copy goes with its
    node): the members' loads fail on it, the group is restored from the checkpoint of step 4 instead, the
    journal says why, and the run still ends bit for bit where the uninterrupted run ends."""
    holder = _Holder.remote()  # type: ignore[attr-defined]
    [lost] = ray.get(holder.hold.remote())
    ray.kill(holder)
    held = KeptShardCopies.held

    def losing(self: KeptShardCopies, *args: Any) -> Any:
        found = held(self, *args)
        return None if found is None else replace(found, refs=(*found.refs[:2], lost, *found.refs[3:]))

    monkeypatch.setattr(KeptShardCopies, "held", losing)
    clean = make_config(*_group(3))
    killed = make_config(*_group(3, "cluster.chunk_steps=2", "faults.kill_rank=1", "faults.kill_at_step=7"))
    assert run(killed, run_dir=tmp_path / "killed") == ExitCode.FINISHED

    [recovered] = events(tmp_path / "killed", "recovered")
    assert recovered["state_from"] == "disk checkpoint" and recovered["step"] == 4
    assert "a shard copy was lost" in recovered["state_reason"]
    b = restored_state(clean, tmp_path / "killed" / "checkpoints")
    assert mismatched(uninterrupted, b) == []


def test_a_save_that_loses_a_rank_before_its_commit_is_abandoned(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """Rank 0 dies after writing its shards of step 8, before handing them over: that save is abandoned
    (never committed, its directory removed) and the group resumes from step 4, ending where the
    uninterrupted run ends. (Shard copies off: with them the group would go on from step 8's copies.)"""
    clean = make_config(*_group(3))
    no_copies = "fault_tolerance.shard_copy_interval_steps=0"
    caught = make_config(*_group(3, "faults.kill_during_checkpoint_step=8", no_copies))
    assert run(caught, run_dir=tmp_path / "caught") == ExitCode.FINISHED
    [abandoned] = [e for e in events(tmp_path / "caught", "checkpoint_failed") if "abandoned" in e["error"]]
    assert "step 8" in abandoned["error"] and "rank 0 was lost" in abandoned["error"]
    [recovered] = events(tmp_path / "caught", "recovered")
    assert recovered["step"] == 4 and recovered["state_from"] == "disk checkpoint"
    store = CheckpointStore(tmp_path / "caught" / "checkpoints")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    for path in store.committed():
        store.verify(path)
    assert mismatched(uninterrupted, restored_state(clean, store.root)) == []


def test_a_sharded_checkpoint_resumes_on_other_world_sizes_as_one_process_would_train(tmp_path: Path) -> None:
    """3 sharded ranks to step 8, then 2 sharded ranks to 12, then one process to 16 — against one process
    all the way (SGD: the rounding of the averaged gradients stays small). Rank 1's shard file of step 8 is
    damaged before the 2-rank run: its digest gives it away, and the run resumes from step 4."""
    sgd = ("optim=sgd", "optim.lr=0.05")
    single = make_config(*JOB, *sgd)
    assert run(single, run_dir=tmp_path / "single") == ExitCode.FINISHED

    mixed = tmp_path / "mixed"
    assert run(make_config(*_group(3, *sgd, "train.steps=8")), run_dir=mixed) == ExitCode.FINISHED
    shard = mixed / "checkpoints" / "step_000000008" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    # The export command passes over it too, and writes the model of step 4 whole.
    assert export_main([str(mixed), str(tmp_path / "model.pt")]) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)

    assert run(make_config(*_group(2, *sgd, "train.steps=12")), run_dir=mixed) == ExitCode.FINISHED
    [skipped] = events(mixed, "checkpoint_skipped")
    assert skipped["path"].endswith("step_000000008") and "__1_0.distcp" in skipped["reason"]
    assert run(single, run_dir=mixed) == ExitCode.FINISHED
    assert [e["step"] for e in events(mixed, "resumed")] == [4, 12]

    reference = restored_state(single, tmp_path / "single" / "checkpoints")
    state = restored_state(single, mixed / "checkpoints")
    assert int(state["step"]) == 16
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    # Read back from the ranks' shards, the tensors are whole: the model's full shapes.
    assert state["model/blocks.0.attn.qkv.weight"].shape == reference["model/blocks.0.attn.qkv.weight"].shape
    assert exported["blocks.0.attn.qkv.weight"].shape == reference["model/blocks.0.attn.qkv.weight"].shape


@pytest.mark.slow  # about 30-60 s; scripts/test.sh --slow runs it
def test_sigterm_to_the_driver_commits_the_step_in_flight_from_every_rank(tmp_path: Path) -> None:
    """The final save of a preempted FSDP run goes the same way: every rank writes its shards of the step it
    stopped at, the driver commits them within the grace period, and the run exits as preempted."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    long = [o for o in _group(3) if not o.startswith(("train.steps=", "checkpoint.interval_steps="))]
    long += ["train.steps=100000", "checkpoint.interval_steps=100000", "cluster.chunk_steps=100000"]
    long += [f"cluster.address={ray.get_runtime_context().gcs_address}", f"hydra.run.dir={run_dir}"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "trainer", *long],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert driver.stdout is not None
        for line in driver.stdout:  # until the group trains
            if "worker group up" in line:
                break
        time.sleep(3.0)
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == ExitCode.PREEMPTED, out[-3000:]
    [preempted] = events(run_dir, "preempted")
    assert preempted["saved_step"] == preempted["step"] >= 1
    store = CheckpointStore(run_dir / "checkpoints")
    [newest] = store.committed()[-1:]
    assert newest.name == f"step_{preempted['saved_step']:09d}"
    manifest = store.verify(newest)
    assert {n.split("_")[2] for n in manifest.files if n.endswith(".distcp")} == {"0", "1", "2"}


@pytest.mark.slow  # about 30-60 s; scripts/test.sh --slow runs it
def test_on_object_storage_every_rank_uploads_its_shards_and_the_manifest_goes_up_last(
    tmp_path: Path, s3_run: tuple[str, dict[str, str], str]
) -> None:
    """checkpoint.dir=s3://…: each rank writes its shards locally and uploads them under the checkpoint's name;
    the driver uploads the merged .metadata and commits with the manifest (create-only); a 2-rank run resumes
    from it on each rank's slices."""
    url, options, bucket = s3_run
    remote = (f"checkpoint.dir={url}", *(f"+checkpoint.storage_options.{k}={v}" for k, v in options.items()))
    assert (
        run(make_config(*_group(3, *remote, "train.steps=8")), run_dir=tmp_path / "run") == ExitCode.FINISHED
    )
    keys = [o["Key"] for o in client(options["endpoint_url"]).list_objects_v2(Bucket=bucket)["Contents"]]
    newest = [k for k in keys if k.startswith("run/step_000000008/")]
    assert "run/step_000000008/manifest.json" in newest and "run/step_000000008/.metadata" in newest
    assert {k.split("/")[-1].split("_")[2] for k in newest if k.endswith(".distcp")} == {"0", "1", "2"}
    manifests = {k.split("/")[1] for k in keys if k.endswith("manifest.json")}
    assert {k.split("/")[1] for k in keys if k.startswith("run/step_")} == manifests  # nothing uncommitted

    resumed = make_config(*_group(2, *remote, "train.steps=10"))
    assert run(resumed, run_dir=tmp_path / "run") == ExitCode.FINISHED
    assert [e["step"] for e in events(tmp_path / "run", "resumed")] == [8]
    assert int(restored_state(resumed, url)["step"]) == 10


@pytest.mark.slow  # about 40 s; scripts/test.sh --slow runs it
def test_a_ddp_run_resumes_from_a_sharded_checkpoint(tmp_path: Path) -> None:
    """The ranks of a DDP group read the sharded checkpoint's tensors whole (DCP assembles them from every
    rank's chunks) and carry on from its step."""
    run_dir = tmp_path / "run"
    assert run(make_config(*_group(3, "train.steps=8")), run_dir=run_dir) == ExitCode.FINISHED
    ddp = make_config(*[o for o in _group(2, "train.steps=10") if o != "train.parallelism=fsdp"])
    assert ddp.train.parallelism == "ddp"
    assert run(ddp, run_dir=run_dir) == ExitCode.FINISHED
    [resumed] = events(run_dir, "resumed")
    assert resumed["step"] == 8 and resumed["rng_restored"] is False  # another world size: re-derived
    assert int(restored_state(ddp, run_dir / "checkpoints")["step"]) == 10


def test_fsdp_with_fp16_is_refused_naming_what_is_allowed() -> None:
    from trainer.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"train\.parallelism=fsdp .*device\.precision=fp16.*allowed: fp32 or bf16"
    ):
        make_config(*_group(2), "device.precision=fp16")
