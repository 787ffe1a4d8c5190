"""Sharded checkpoints in three real processes joined by gloo: each rank writes only its own shards (no
collective after the state is staged), one party merges the parts and commits, and the checkpoint reads
back whole on one process, through the export command and with stock DCP; a damaged shard of one rank is
found by its digest."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from trainer.checkpoint import CheckpointManager
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.export import export
from trainer.checkpoint.objects import ObjectStore
from trainer.checkpoint.sharded import RankPart, commit_parts, commit_uploaded
from trainer.checkpoint.store import CheckpointStore
from trainer.errors import CheckpointCorruptError, CheckpointWriteError
from trainer.testing.configs import TWO_BLOCKS_CPU, make_config
from trainer.testing.s3 import free_port
from trainer.worker import Worker

WORLD = 3
OVERRIDES = (
    *TWO_BLOCKS_CPU,
    "train.global_batch_size=6",
    "train.parallelism=fsdp",
)


def _rank(rank: int, port: int, directory: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    worker = Worker(make_config(*OVERRIDES))
    worker.setup()
    worker.attach(rank, WORLD)
    for _ in range(2):
        worker.train_step()
    checkpointer = AsyncCheckpointer(CheckpointManager(Path(directory).parent))
    future, header = worker.save_part_async(checkpointer, Path(directory), {"eval_loss": 1.5})
    whole = {k: t.clone() for k, t in worker.capture().tensors.items()}  # collective: the reference
    overlapped = list(checkpointer.staging.overlapped)
    worker.train_step()  # the shards' copies may still be in flight: the step waits for them
    stepped = {k: t.clone() for k, t in worker.capture().tensors.items()}
    part = future.result()
    with open(os.path.join(out, f"part{rank}.pkl"), "wb") as f:
        pickle.dump({"part": part, "header": header, "overlapped": overlapped, "stepped": stepped}, f)
    checkpointer.close()

    # The same shards committed into a store of their own, then restored by the three ranks of a fresh
    # sharded worker: each reads only its slices.
    parts: list[RankPart] = [None] * WORLD  # type: ignore[list-item]
    dist.gather_object(part, parts if rank == 0 else None, dst=0)
    store = CheckpointStore(Path(out) / "reloaded")
    if rank == 0:
        copy = store.begin(2)
        shutil.copytree(directory, copy, dirs_exist_ok=True)
        commit_parts(store, copy, parts, header, WORLD)
        torch.save(whole, os.path.join(out, "whole.pt"))
    dist.barrier()
    fresh = Worker(make_config(*OVERRIDES))
    fresh.setup()
    fresh.attach(rank, WORLD)
    restored = fresh.restore(CheckpointManager(store.root), clean=False)
    assert restored is not None
    local = {
        k: t.to_local().clone()
        for k, t in fresh.capture(gather=False).tensors.items()
        if hasattr(t, "to_local")
    }
    again = {k: t.clone() for k, t in fresh.capture().tensors.items()}  # gathered whole
    torch.save({"again": again, "local": local, "step": fresh.step}, os.path.join(out, f"reloaded{rank}.pt"))
    dist.destroy_process_group()


def _parts(out: Path) -> tuple[list[RankPart], dict]:
    loaded = [pickle.loads((out / f"part{r}.pkl").read_bytes()) for r in range(WORLD)]
    return [x["part"] for x in loaded], loaded[0]["header"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three ranks train two steps and write their shards into one private directory of a store."""
    root = tmp_path_factory.mktemp("sharded")
    store = CheckpointStore(root / "checkpoints")
    directory = store.begin(2)
    mp.spawn(_rank, args=(free_port(), str(directory), str(root)), nprocs=WORLD)
    shutil.copytree(directory, root / "written")  # the ranks' files as written, for the other tests
    return root, directory


def _committed_copy(root: Path, store: CheckpointStore, step: int) -> Path:
    """The ranks' files committed again into ``store`` as the checkpoint of ``step``."""
    parts, header = _parts(root)
    directory = store.begin(step)
    shutil.copytree(root / "written", directory, dirs_exist_ok=True)
    return commit_parts(store, directory, parts, {**header, "step": step}, WORLD)


def test_each_rank_writes_only_its_own_shards_and_a_commit_makes_one_checkpoint(
    sharded: tuple[Path, Path],
) -> None:
    root, directory = sharded
    parts, header = _parts(root)
    assert header is not None and header["world_size"] == WORLD
    for part in parts:  # rank k's files only, named as DCP names a rank's files
        assert {n for n in part.files if n.endswith(".distcp")} and all(
            n.startswith(f"__{part.rank}_") or n == f"rng/rank_{part.rank:05d}.json" for n in part.files
        )
    for rank in range(WORLD):  # every shard the optimizer steps was copied beside the next step
        written = pickle.loads((root / f"part{rank}.pkl").read_bytes())
        stepped = {k for k in parts[rank].metadata.state_dict_metadata if k.startswith("optimizer.state.")}
        assert stepped and stepped <= set(written["overlapped"]), rank
    shard_bytes = [sum(v["bytes"] for n, v in p.files.items() if n.endswith(".distcp")) for p in parts]
    assert min(shard_bytes) > 0
    assert not (directory / ".metadata").exists()  # nothing committed, no index yet
    assert CheckpointStore(directory.parent).committed() == []

    final = commit_parts(CheckpointStore(directory.parent), directory, parts, header, WORLD)
    assert final.name == "step_000000002" and not directory.exists()
    assert (directory.parent / "latest").read_text().strip() == final.name
    manifest = CheckpointStore(final.parent).verify(final)  # every rank's file listed with its digest
    assert {n for p in parts for n in p.files} | {".metadata"} == set(manifest.files)
    assert manifest.metrics["eval_loss"] == 1.5 and manifest.world_size == WORLD

    whole = torch.load(root / "whole.pt", weights_only=True)
    # One process restores it whole: DCP assembles every tensor from the ranks' chunks.
    single = Worker(make_config(*OVERRIDES))
    single.setup()
    restored = single.restore(CheckpointManager(final.parent))
    assert restored is not None and single.step == 2
    state = single.capture().tensors
    assert state.keys() == whole.keys()
    for key, tensor in whole.items():
        assert torch.equal(state[key], tensor), key
    stepped = pickle.loads((root / "part0.pkl").read_bytes())["stepped"]
    assert not torch.equal(stepped["model.head.weight"], whole["model.head.weight"])  # a step came after

    # Stock DCP reads the model half, and the export command writes a plain state dict.
    model = {
        k.removeprefix("model."): torch.empty_like(t) for k, t in whole.items() if k.startswith("model.")
    }
    dcp.load({"model": model}, checkpoint_id=final, no_dist=True)
    assert all(torch.equal(model[k], whole["model." + k]) for k in model)
    done = export(final, root / "model.pt")
    exported = torch.load(done.out, weights_only=True)
    assert all(torch.equal(exported[k], model[k]) for k in model)


def test_a_sharded_load_reads_each_rank_its_slices_and_keeps_the_state(sharded: tuple[Path, Path]) -> None:
    root, _ = sharded
    whole = torch.load(root / "whole.pt", weights_only=True)
    reloaded = [torch.load(root / f"reloaded{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in reloaded:
        assert r["step"] == 2 and r["again"].keys() == whole.keys()
        for key, tensor in whole.items():
            assert torch.equal(r["again"][key], tensor), key
    key = "model.blocks.0.attn.qkv.weight"
    sizes = [r["local"][key].shape[0] for r in reloaded]
    assert sum(sizes) == whole[key].shape[0] and max(sizes) < whole[key].shape[0]  # slices, not copies


def test_a_missing_rank_part_or_a_stray_file_is_not_committed(
    tmp_path: Path, sharded: tuple[Path, Path]
) -> None:
    root, _ = sharded
    parts, header = _parts(root)
    store = CheckpointStore(tmp_path / "checkpoints")
    directory = store.begin(2)
    with pytest.raises(CheckpointWriteError, match=r"parts from ranks \[0, 2\], expected one from each of 3"):
        commit_parts(store, directory, [parts[0], parts[2]], header, WORLD)
    # Rank 1's part handed in twice (once under rank 2's name): its chunks cover the tensors wrongly.
    twice = dataclasses.replace(parts[1], rank=2)
    with pytest.raises(CheckpointWriteError, match=r"the ranks' shards hold \d+ of its \d+ elements"):
        commit_parts(store, directory, [parts[0], parts[1], twice], header, WORLD)
    # A file in the directory that no rank reported is refused too.
    (directory / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointWriteError, match=r"files no rank wrote \['stray\.bin'\]"):
        commit_parts(store, directory, parts, header, WORLD)
    assert store.committed() == []


def test_a_damaged_shard_of_one_rank_is_found_and_the_previous_checkpoint_is_used(
    tmp_path: Path, sharded: tuple[Path, Path]
) -> None:
    root, _ = sharded
    store = CheckpointStore(tmp_path / "checkpoints")
    first, second = _committed_copy(root, store, 2), _committed_copy(root, store, 4)
    committed = store.root
    assert (committed / "latest").read_text().strip() == second.name
    shard = second / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    with pytest.raises(CheckpointCorruptError, match=r"__1_0\.distcp: checksum"):
        CheckpointStore(committed).verify(second)
    worker = Worker(make_config(*OVERRIDES))
    worker.setup()
    restored = worker.restore(CheckpointManager(committed))
    assert restored is not None and restored.path == first and worker.step == 2
    assert [Path(p).name for p, _ in restored.skipped] == [second.name]


def test_on_object_storage_the_uploaded_shards_commit_with_the_manifest_last(
    sharded: tuple[Path, Path], s3_run: tuple[str, dict[str, str], str]
) -> None:
    """The ranks' files uploaded under a reserved name are invisible until the manifest goes up; a stray
    object there is refused, a discarded save leaves nothing, and a committed one restores whole."""
    root, _ = sharded
    parts, header = _parts(root)
    url, options, _ = s3_run
    store = ObjectStore(url, storage_options=options)
    local = root / "written"
    files = sorted(n for p in parts for n in p.files)

    name = store.reserve(2)
    store.upload(local, name, files)
    store.upload(root, name, ["whole.pt"])  # an object no rank wrote
    with pytest.raises(CheckpointWriteError, match=r"files no rank wrote \['whole\.pt'\]"):
        commit_uploaded(store, name, parts, header, WORLD)
    assert store.committed() == []
    store.discard(name)
    assert store.uploaded(name) == {}

    name = store.reserve(2)
    store.upload(local, name, files)
    assert store.committed() == []  # uploaded, not committed
    committed = commit_uploaded(store, name, parts, header, WORLD)
    assert store.committed() == [committed] and store.latest_pointer() == committed
    worker = Worker(make_config(*OVERRIDES))
    worker.setup()
    assert worker.restore(CheckpointManager(url, storage_options=options)) is not None
    whole = torch.load(root / "whole.pt", weights_only=True)
    state = worker.capture().tensors
    assert all(torch.equal(state[k], t) for k, t in whole.items())
