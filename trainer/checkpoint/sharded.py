"""Sharded checkpoints (``train.parallelism=fsdp``): every rank writes its own shards, one party commits.

A checkpoint of sharded state is one directory, laid out as DCP lays out a multi-rank save::

    .metadata              DCP's index of every chunk of every tensor (merged from the ranks' parts)
    __<rank>_<i>.distcp    the shards rank <rank> holds (and, from rank 0, the replicated tensors)
    rng/rank_<rank>.json   each rank's RNG state
    manifest.json          step, hyper-parameters, scheduler… and the digest of every file above

so stock ``dcp.load`` (and :func:`~trainer.checkpoint.manager.read_tensors`) reads it on any world size,
one process included: DCP assembles each tensor from the chunks it needs.

The save has no collective after the state is staged. DCP's own multi-rank save gathers the ranks' plans and
write results with collectives (from a background thread in ``async_save``), which would collide with a group
being re-formed; here each rank plans its own items (:func:`split`: the local shard of each DTensor at its
global offset), writes them in the background (:func:`write_part`) into the checkpoint's private directory
and returns a :class:`RankPart` — its files with their XXH3 digests and the DCP metadata of its items. After
every rank returned, one party (the driver) merges the parts into ``.metadata``, checks that the files on
disk are exactly the ones the ranks wrote, at the sizes they wrote, writes the manifest and commits the
directory atomically (:func:`commit_parts`). A save that loses a rank before that (it died, the group was
re-formed under it) is abandoned: its directory is never renamed into place and is removed.

On object storage the directory is a name the committing party reserved (``ObjectStore.reserve``): each rank
writes its part into a local spool and uploads it there, the committing party uploads ``.metadata``, checks
the objects found against the ranks' files and sizes, and commits by putting the manifest up create-only
(:func:`commit_uploaded`); until then the objects are invisible, and an abandoned save's are deleted.

Only tensors go through DCP; everything else (param groups, scheduler, scaler, the task's JSON values) is in
the manifest, written from rank 0's :func:`manifest_header`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

from trainer.checkpoint import layout
from trainer.checkpoint import rng as rng_io
from trainer.checkpoint.dcp_writer import DigestingWriter
from trainer.checkpoint.manifest import MANIFEST_NAME, Manifest, checksum_files, file_digest
from trainer.checkpoint.objects import ObjectStore
from trainer.checkpoint.state import PortableState
from trainer.checkpoint.store import CheckpointStore, fsync_path
from trainer.errors import CheckpointWriteError

#: DCP's index file, written by the committing party.
METADATA_NAME = ".metadata"


@dataclass(frozen=True)
class Placement:
    """Where a rank's piece of a tensor sits in the whole: the whole's shape and the piece's offsets."""

    size: tuple[int, ...]
    offsets: tuple[int, ...]


@dataclass
class RankPart:
    """What one rank wrote into a sharded checkpoint's directory."""

    rank: int
    #: ``{file name relative to the checkpoint: {"xxh3_128", "bytes"}}``, taken as the bytes were written.
    files: dict[str, dict[str, Any]]
    #: DCP metadata of this rank's items only (its chunks and where they are in its files).
    metadata: Metadata


@dataclass
class SplitState:
    """One rank's share of a sharded state, ready to stage: plain local tensors and where each sits."""

    tensors: dict[str, torch.Tensor]
    #: Placement of each local shard in its whole tensor; keys absent here are whole tensors.
    placements: dict[str, Placement] = field(default_factory=dict)


def split(tensors: dict[str, torch.Tensor], rank: int) -> SplitState:
    """This rank's share of ``tensors`` (DTensors of a live group, or plain replicated tensors), computed
    locally (no collective): the local shard of every DTensor this rank owns — where a shard is replicated
    over a mesh dimension, the rank at coordinate 0 of it owns it — and, on rank 0 only, the plain tensors
    (every rank holds the same). Empty shards (a dimension smaller than the group) are left out."""
    out = SplitState({})
    for key, tensor in tensors.items():
        if not isinstance(tensor, DTensor):
            if rank == 0:
                out.tensors[key] = tensor.detach()
            continue
        coordinate = tensor.device_mesh.get_coordinate()
        if coordinate is None:
            continue  # not in this tensor's mesh
        replicated = [c for c, p in zip(coordinate, tensor.placements, strict=True) if p.is_replicate()]
        if any(replicated):
            continue  # another rank holds the same chunk and writes it
        [chunk] = tensor.__create_chunk_list__()
        local = tensor.to_local().detach()
        if tuple(local.shape) != tuple(chunk.sizes):
            raise CheckpointWriteError(
                f"{key}: the local shard is {list(local.shape)}, its chunk says {list(chunk.sizes)}"
            )
        if local.numel() == 0 and (rank != 0 or math.prod(tensor.shape) != 0):
            continue  # nothing of it here (an empty tensor is still listed, by rank 0)
        out.tensors[key] = local
        out.placements[key] = Placement(tuple(tensor.shape), tuple(chunk.offsets))
    return out


class _Shard:
    """A local tensor standing for its chunk of a larger tensor, as DCP's planner asks for it."""

    def __init__(self, tensor: torch.Tensor, placement: Placement) -> None:
        self.tensor, self.placement = tensor, placement

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        offsets = torch.Size(self.placement.offsets)
        return [
            WriteItem(
                index=MetadataIndex(fqn, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=self.tensor.shape),
                    properties=TensorProperties.create_from_tensor(self.tensor),
                    size=torch.Size(self.placement.size),
                ),
            )
        ]


class _ShardPlanner(DefaultSavePlanner):
    """DCP's planner over one rank's items: a :class:`_Shard` resolves to its local tensor."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        return obj.tensor if isinstance(obj, _Shard) else super().lookup_object(index)


class _PartWriter(DigestingWriter):
    """A :class:`DigestingWriter` for one rank of a sharded save: its files are ``__<rank>_<i>.distcp``, and
    DCP's metadata of its items is kept (:attr:`metadata`) for the committing party instead of written."""

    def __init__(self, path: Path, rank: int, direct: bool = False) -> None:
        super().__init__(path, thread_count=2, direct=direct)
        self.part_rank = rank
        self.metadata: Metadata | None = None

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=_StoragePrefix(f"__{self.part_rank}_")) for p in plans]

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        self.metadata = metadata


def write_part(
    directory: Path,
    rank: int,
    state: SplitState,
    rng_key: str,
    rng_states: dict[str, torch.Tensor],
    *,
    direct: bool = False,
    sync: bool = True,
) -> RankPart:
    """Write this rank's share into the checkpoint directory ``directory`` (shared by the ranks): its DCP
    files and its RNG state, each file fsynced (unless not ``sync``: a local copy on its way to object
    storage); no collective. Returns what it wrote."""
    nested = layout.nested(
        {k: _Shard(t, state.placements[k]) if k in state.placements else t for k, t in state.tensors.items()}  # type: ignore[misc]
    )
    writer = _PartWriter(directory, rank, direct)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(nested, storage_writer=writer, planner=_ShardPlanner(), no_dist=True)
    assert writer.metadata is not None
    rng_io.write_rng(directory, rank, rng_key, rng_states)
    rng_name = rng_io.rng_file(directory, rank).relative_to(directory).as_posix()
    files = {**writer.digests, rng_name: _digest(rng_io.rng_file(directory, rank))}
    for name in writer.digests if sync else ():
        fsync_path(directory / name)  # the committing party may be on another node: the writer syncs
    return RankPart(rank, files, writer.metadata)


def _digest(path: Path) -> dict[str, Any]:
    return {"xxh3_128": file_digest(path), "bytes": path.stat().st_size}


def merge_metadata(parts: list[RankPart]) -> Metadata:
    """One DCP metadata for the whole checkpoint from the ranks' parts; raises CheckpointWriteError naming
    the tensor when the chunks of the ranks do not cover a tensor exactly once (a rank's part missing)."""
    tensors: dict[str, TensorStorageMetadata] = {}
    storage: dict[MetadataIndex, Any] = {}
    planner: dict[str, Any] = {}
    for part in sorted(parts, key=lambda p: p.rank):
        for fqn, entry in part.metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointWriteError(f"rank {part.rank} wrote {fqn!r} as bytes; only tensors are saved")
            merged = tensors.setdefault(fqn, TensorStorageMetadata(entry.properties, entry.size, []))
            if merged.size != entry.size or merged.properties.dtype != entry.properties.dtype:
                raise CheckpointWriteError(
                    f"{fqn}: rank {part.rank} wrote it as {list(entry.size)} {entry.properties.dtype}, another "
                    f"rank as {list(merged.size)} {merged.properties.dtype}"
                )
            merged.chunks.extend(entry.chunks)
        storage.update(part.metadata.storage_data or {})
        planner.update(part.metadata.planner_data or {})
    for fqn, entry in tensors.items():
        covered = sum(math.prod(c.sizes) for c in entry.chunks)
        if covered != math.prod(entry.size):
            raise CheckpointWriteError(
                f"{fqn}: the ranks' shards hold {covered} of its {math.prod(entry.size)} elements "
                f"(parts from ranks {sorted(p.rank for p in parts)})"
            )
    first = parts[0].metadata
    return Metadata(
        state_dict_metadata=dict(tensors),
        planner_data=planner,
        storage_data=storage,
        storage_meta=first.storage_meta,
        version=first.version,
    )


def manifest_header(
    state: PortableState,
    adapter_name: str,
    rng_key: str,
    adapter_description: dict[str, Any],
    progress: Any,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The manifest's fields but ``files`` and ``created_at``, from the (whole or sharded) state; JSON, so
    rank 0 can hand it to the committing party with its reply."""
    return {
        "step": progress.step,
        "samples_seen": progress.samples_seen,
        "world_size": progress.world_size,
        "family": adapter_name,
        "rng_key": rng_key,
        "torch_version": torch.__version__,
        "adapter": adapter_description,
        # A DTensor's shape is the whole tensor's.
        "tensors": {
            k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for k, t in state.tensors.items()
        },
        "optimizer": state.optimizer,
        "scaler": state.scaler,
        "task_state": state.task_state,
        "config": config,
        "history": list(progress.history),
        "metrics": dict(progress.metrics),
    }


def _checked_metadata(
    where: str, parts: list[RankPart], header: dict[str, Any], world_size: int
) -> tuple[Metadata, dict[str, dict[str, Any]]]:
    """The merged metadata and every rank's files, once every rank of ``world_size`` returned its part and
    the parts cover every tensor the manifest lists; else CheckpointWriteError."""
    ranks = sorted(p.rank for p in parts)
    if ranks != list(range(world_size)):
        raise CheckpointWriteError(
            f"{where}: parts from ranks {ranks}, expected one from each of {world_size}; not committed"
        )
    metadata = merge_metadata(parts)
    unwritten = sorted(set(header["tensors"]) - set(metadata.state_dict_metadata))
    if unwritten:
        raise CheckpointWriteError(f"{where}: no rank wrote {unwritten[:8]}; not committed")
    written: dict[str, dict[str, Any]] = {}
    for part in parts:
        written.update(part.files)
    return metadata, written


def _write_metadata(directory: Path, metadata: Metadata) -> None:
    with open(directory / METADATA_NAME, "wb") as f:
        pickle.dump(metadata, f)
        f.flush()
        os.fsync(f.fileno())


def _check_present(where: str, present: dict[str, int], written: dict[str, dict[str, Any]]) -> None:
    """The files found (``{path: size}``) are exactly the ones written, at the sizes written."""
    if set(present) != set(written):
        raise CheckpointWriteError(
            f"{where}: files missing {sorted(set(written) - set(present))}, files no rank wrote "
            f"{sorted(set(present) - set(written))}; not committed"
        )
    for name, size in sorted(present.items()):
        if size != written[name]["bytes"]:
            raise CheckpointWriteError(
                f"{where}/{name}: {written[name]['bytes']} bytes written, {size} found; not committed"
            )


def commit_parts(
    store: CheckpointStore, directory: Path, parts: list[RankPart], header: dict[str, Any], world_size: int
) -> Path:
    """Commit the sharded checkpoint written into ``directory`` (from ``store.begin``) once every rank of
    ``world_size`` returned its part: the merged ``.metadata``, the check that the directory holds exactly the
    files the ranks wrote at the sizes they wrote, the manifest with every file's digest, then the store's
    atomic commit (fsync, rename, ``latest``). Returns the committed directory; raises CheckpointWriteError
    (nothing committed) when a part is missing or a file does not match."""
    metadata, written = _checked_metadata(str(directory), parts, header, world_size)
    _write_metadata(directory, metadata)
    present = {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in directory.rglob("*")
        if p.is_file() and p.name not in (MANIFEST_NAME, METADATA_NAME)
    }
    _check_present(str(directory), present, written)
    files = checksum_files(directory, written)  # digests the .metadata
    return store.commit(directory, Manifest(**header, files=files, created_at=time.time()))


def commit_uploaded(
    store: ObjectStore, name: str, parts: list[RankPart], header: dict[str, Any], world_size: int
) -> str:
    """:func:`commit_parts` on object storage: the ranks uploaded their files under checkpoint ``name``
    (``store.reserve``); the merged ``.metadata`` goes up, the objects found must be exactly the ones written
    at their sizes, then the manifest goes up create-only (``store.publish``). Returns the checkpoint's URL."""
    where = f"{store.url}/{name}"
    metadata, written = _checked_metadata(where, parts, header, world_size)
    scratch = store.scratch()
    try:
        _write_metadata(scratch, metadata)
        written[METADATA_NAME] = _digest(scratch / METADATA_NAME)
        store.upload(scratch, name, [METADATA_NAME])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _check_present(where, store.uploaded(name), written)
    files = {k: written[k] for k in sorted(written)}
    return store.publish(name, Manifest(**header, files=files, created_at=time.time()))
