"""DCP's file writer at disk speed: parallel files, digests taken on the bytes as they are written.

DCP's own ``FileSystemWriter`` costs more CPU than the disk needs: every tensor goes through ``torch.save``
with a CRC-32 pass over its bytes (~4 GB/s on one core here, slower than a fast disk), and the toolkit then
read every file back to digest it. :class:`DigestingWriter` writes the same DCP files — each tensor a
``torch.save`` record at an offset listed in ``.metadata``, so stock ``dcp.load`` and ``torch.load`` read
them — but:

* the XXH3-128 digest of each file is updated with each piece as it is written (no second read): the
  manifest's digests (:attr:`DigestingWriter.digests`) describe exactly the bytes handed to the file;
* no CRC-32 inside the records: the whole-file digest, checked before any tensor is loaded, already covers
  every byte, and ``torch.load`` reads records without one;
* ``thread_count`` files are written at once, by threads that return their errors (DCP's extra writer
  threads drop theirs), largest tensors spread first so the files end together;
* no fsync per file: the commit syncs the checkpoint once (``store.commit``), before the rename.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

#: Bytes hashed and handed to the file per call: small enough that one thread's hashing overlaps another's
#: write, large enough that the per-call cost vanishes.
_PIECE = 8 << 20
#: Bytes after which the pages written so far are handed to the disk (see DigestingStream.write).
_KICK = 32 << 20


class DigestingStream(io.RawIOBase):
    """A write-only file that digests (XXH3-128) and counts every byte on its way to ``file``."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self._file = file
        self._digest = xxhash.xxh3_128()
        self.bytes = 0
        self._kicked = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) <= _PIECE:  # record headers and most tensors: one piece
            self._digest.update(view)
            self._file.write(view)
            self.bytes += len(view)
            if self.bytes - self._kicked >= _KICK:
                self._start_writeback()
            return len(view)
        for start in range(0, len(view), _PIECE):
            piece = view[start : start + _PIECE]
            self._digest.update(piece)
            self._file.write(piece)
        self.bytes += len(view)
        if self.bytes - self._kicked >= _KICK:
            self._start_writeback()
        return len(view)

    def _start_writeback(self) -> None:
        """Start the disk writing what is written so far, without waiting for it. Left alone, the kernel
        writes dirty pages only at the commit's fsync (or once they reach a tenth of memory), so the disk
        idles while the records are serialised; started early, disk time and CPU time overlap and the
        fsync finds little left. (``POSIX_FADV_DONTNEED`` starts writeback of dirty pages and drops only
        pages already clean; nothing here reads them back.)"""
        if hasattr(os, "posix_fadvise"):
            self._file.flush()
            os.posix_fadvise(
                self._file.fileno(), self._kicked, self.bytes - self._kicked, os.POSIX_FADV_DONTNEED
            )
        self._kicked = self.bytes

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self._file.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def save_record(tensor: torch.Tensor, stream: Any) -> None:
    """``torch.save(tensor, stream)`` without the CRC-32 pass over the data (same format otherwise)."""
    writer = torch._C.PyTorchFileWriter(stream, False, torch.serialization._get_storage_alignment())
    torch.serialization._save(tensor, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()


def _size(item: WriteItem) -> int:
    if item.tensor_data is None:
        return 0
    return item.tensor_data.size.numel() * torch._utils._element_size(item.tensor_data.properties.dtype)


def _buckets(items: list[WriteItem], count: int) -> list[list[WriteItem]]:
    """``items`` in at most ``count`` groups of about equal bytes (largest first into the lightest)."""
    buckets: list[list[WriteItem]] = [[] for _ in range(max(1, count))]
    sizes = [0] * len(buckets)
    for item in sorted(items, key=_size, reverse=True):
        lightest = sizes.index(min(sizes))
        buckets[lightest].append(item)
        sizes[lightest] += _size(item)
    return [b for b in buckets if b]


class DigestingWriter(FileSystemWriter):
    """A DCP storage writer for one local directory (see the module docstring); after ``dcp.save``,
    :attr:`digests` holds ``{file name: {"xxh3_128", "bytes"}}`` of every data file it wrote."""

    def __init__(self, path: str | os.PathLike[str], thread_count: int = 2) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=thread_count)
        self.digests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data.prefix
        jobs = [
            (f"{prefix}{i}{DEFAULT_SUFFIX}", bucket)
            for i, bucket in enumerate(_buckets(plan.items, self.thread_count))
        ]
        if len(jobs) <= 1:
            results = [self._write_file(name, items, planner) for name, items in jobs]
        else:
            with ThreadPoolExecutor(len(jobs), thread_name_prefix="dcp-file-writer") as pool:
                results = list(pool.map(lambda job: self._write_file(job[0], job[1], planner), jobs))
        done: Future[list[WriteResult]] = Future()
        done.set_result([r for file_results in results for r in file_results])
        return done

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        results = []
        with open(Path(self.path) / name, "wb") as file:
            stream = DigestingStream(file)
            for item in items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    stream.write(data.getbuffer())
                else:
                    assert isinstance(data, torch.Tensor) and data.device.type == "cpu", "CPU tensors only"
                    if data.untyped_storage().nbytes() != data.nbytes:
                        data = data.clone()  # a view would be saved with the whole storage behind it
                    save_record(data, stream)
                length = stream.tell() - offset
                results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
            stream.flush()
        with self._lock:
            self.digests[name] = {"xxh3_128": stream.hexdigest(), "bytes": stream.bytes}
        return results
