"""Reading DCP checkpoints without unpickling arbitrary objects.

DCP stores its ``.metadata`` file as a pickle and, for non-tensor values, calls ``torch.load`` with
``weights_only=False``. Either would run code from a hostile checkpoint. Here the metadata is read with an
unpickler that resolves only DCP's own metadata classes and torch's size/dtype/layout objects, and the load
planner refuses non-tensor items (this toolkit stores every non-tensor value in the JSON manifest).
Tensor payloads are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from trainer.errors import UnsafeCheckpointError

_DCP_METADATA_CLASSES = {
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
}
_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": _DCP_METADATA_CLASSES,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch._utils": {"_get_layout"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}
_DTYPE_NAMES = {str(dt).removeprefix("torch.") for dt in vars(torch).values() if isinstance(dt, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"checkpoint metadata references {module}.{name}, which is not DCP metadata; refusing to load it"
        )


def load_metadata(data: bytes, origin: str) -> Metadata:
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{origin}: {exc}") from None
    except Exception as exc:  # any malformed pickle: truncated, wrong opcodes, wrong shapes
        raise UnsafeCheckpointError(
            f"{origin}: unreadable DCP metadata ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{origin}: DCP metadata is a {type(metadata).__name__}, not Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A FileSystemReader whose metadata is read by a restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.path.join(os.fspath(self.path), ".metadata")
        with open(path, "rb") as f:
            metadata = load_metadata(f.read(), path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Loads tensors in place; refuses byte items, which DCP would unpickle without restriction."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(
            f"checkpoint stores {read_item.dest_index.fqn!r} as a pickled object; only tensors are loaded"
        )
