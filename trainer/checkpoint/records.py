"""``torch.save`` records of single tensors, as the checkpoint writer puts them into DCP's files.

Each tensor in a DCP file is one ``torch.save`` record (a small zip) at an offset listed in ``.metadata``,
which stock ``dcp.load`` and ``torch.load`` read. :func:`save_record` writes one without torch's CRC-32
pass over the data and with its data at a chosen alignment; :class:`RecordTemplates` writes the same bytes
with torch's serialiser run once per kind of tensor.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import pickle
from typing import Any

import numpy as np
import torch


def address(view: memoryview) -> int:
    """The address of a buffer's first byte."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def save_record(tensor: torch.Tensor, stream: Any, alignment: int | None = None) -> None:
    """``torch.save(tensor, stream)`` without the CRC-32 pass over the data (same format otherwise); the
    data starts at a multiple of ``alignment`` from the record's start (default: torch's, 64 bytes), as its
    ``.storage_alignment`` entry says."""
    if alignment is None:
        alignment = torch.serialization._get_storage_alignment()
    writer = torch._C.PyTorchFileWriter(stream, False, alignment)
    try:
        torch.serialization._save(
            tensor, _Aligned(writer, alignment), pickle, torch.serialization.DEFAULT_PROTOCOL, False
        )
    except BaseException:
        # Finish the record now (as torch.save does): an unfinished writer finishes itself when collected,
        # writing to a stream that fails, and an error there aborts the process.
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    writer.write_end_of_file()


class _Aligned:
    """The zip writer as ``torch.serialization._save`` sees it, with the ``.storage_alignment`` entry it
    writes (torch's global setting) replaced by the alignment this writer uses."""

    def __init__(self, writer: Any, alignment: int) -> None:
        self._writer, self._alignment = writer, str(alignment)

    def write_record(self, name: str, data: Any, size: int) -> None:
        if name == ".storage_alignment":
            data, size = self._alignment, len(self._alignment)
        self._writer.write_record(name, data, size)

    def write_record_metadata(self, name: str, size: int) -> None:
        self._writer.write_record_metadata(name, size)


class RecordTemplates:
    """:func:`save_record`'s bytes around each tensor's data, made once per kind of tensor and reused.

    A record's bytes other than its data depend only on the tensor's dtype, shape, strides,
    ``requires_grad`` and the data's alignment: no CRC-32 is written, and torch's serialisation id is
    derived from the records' sizes. So torch serialises the first tensor of each kind (into memory, its
    data left where it is), and every tensor of that kind is then written as those bytes, its own data,
    and the rest. A 740-tensor GPT state has 10 kinds: torch's serialiser runs 10 times instead of 740,
    and a record reaches the stream in 3 writes instead of ~40 (29,000 Python calls per save). Tensors
    whose pickle could carry more (a subclass, Python attributes, a view into a larger storage, a
    quantized or sparse tensor, a non-leaf, a conjugate or negative bit: :func:`_kind`) go through
    :func:`save_record` every time."""

    def __init__(self) -> None:
        #: kind -> (bytes before the data, bytes after it), or None when the data could not be told apart.
        self._made: dict[tuple[Any, ...], tuple[bytes, bytes] | None] = {}

    def write(self, tensor: torch.Tensor, stream: Any, alignment: int | None = None) -> None:
        """What ``save_record(tensor, stream, alignment)`` writes, byte for byte."""
        kind = _kind(tensor, alignment)
        if kind is not None and kind not in self._made:
            self._made[kind] = _template(tensor, alignment)
        made = None if kind is None else self._made[kind]
        if made is None:
            save_record(tensor, stream, alignment)
            return
        before, after = made
        stream.write(before)
        if tensor.nbytes:
            data = (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())
            with memoryview(data) as view, view.cast("B") as raw:
                stream.write(raw)
        stream.write(after)


def _kind(tensor: torch.Tensor, alignment: int | None) -> tuple[Any, ...] | None:
    """What a tensor's record depends on besides its data; None for tensors whose record may say more."""
    if (
        type(tensor) is not torch.Tensor
        or tensor.device.type != "cpu"
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.grad_fn is not None
        or tensor.is_conj()
        or tensor.is_neg()
        or tensor.storage_offset()
        or tensor.untyped_storage().nbytes() != tensor.nbytes
        or torch._utils._get_obj_state(tensor)
        or torch._utils.get_tensor_metadata(tensor)
    ):
        return None
    return (tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.requires_grad, alignment)


class _Capture(io.RawIOBase):
    """A stream that keeps the bytes written before and after one tensor's data (told by its address)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._address, self._nbytes = tensor.data_ptr(), tensor.nbytes
        self.before, self.after = bytearray(), bytearray()
        self.data_seen = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        is_data = len(view) == self._nbytes and len(view) and address(view) == self._address
        if is_data and not self.data_seen:
            self.data_seen = True
        else:
            (self.after if self.data_seen else self.before).extend(view)
        return len(view)


def _template(tensor: torch.Tensor, alignment: int | None) -> tuple[bytes, bytes] | None:
    capture = _Capture(tensor)
    save_record(tensor, capture, alignment)
    if tensor.nbytes and not capture.data_seen:
        return None  # the serialiser copied the data first: nothing to reuse
    return bytes(capture.before), bytes(capture.after)
