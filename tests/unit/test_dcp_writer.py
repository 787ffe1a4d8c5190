"""The checkpoint writer: digests taken while writing are the files' digests, and damage is still found.

Saves a small GPT's state through the real CheckpointManager, then reads the files back independently.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash

from trainer.checkpoint import CheckpointManager, TrainingProgress, dcp_writer, layout, records
from trainer.checkpoint import manifest as manifest_module
from trainer.checkpoint.async_writer import AsyncCheckpointer
from trainer.checkpoint.manifest import Manifest, checksum_files
from trainer.checkpoint.safe_dcp import SafeFileSystemReader
from trainer.checkpoint.staging import StagingBuffers
from trainer.checkpoint.state import capture
from trainer.checkpoint.store import verify_dir
from trainer.devices import get_adapter
from trainer.errors import CheckpointCorruptError, CheckpointWriteError
from trainer.model import GPT

ADAPTER = get_adapter("cpu")


def _state() -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, seq_len=8, n_layer=2, n_head=2, n_embd=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def _save(manager: CheckpointManager, step: int = 1) -> Path:
    model, optimizer = _state()
    state = capture(model, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    rng = ADAPTER.get_rng_state(torch.device("cpu"))
    path = manager.save(state, rng, ADAPTER, TrainingProgress(step, step, 1, 0), {})
    assert isinstance(path, Path)
    return path


def _xxh3_of(path: Path) -> str:
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_digests_taken_while_writing_are_those_of_the_files_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    # Small blocks: many direct writes per file and a tail that fills no block; buffered: many kicks.
    monkeypatch.setattr(dcp_writer, "PIECE", 4096)
    monkeypatch.setattr(dcp_writer, "_KICK", 4096)
    opened: list[int | None] = []
    real_open = dcp_writer._open_direct

    def spying_open(path: Path) -> int | None:
        opened.append(real_open(path) if direct else None)
        return opened[-1]

    probe = real_open(tmp_path / "probe")
    if probe is None and direct:
        pytest.skip(f"{tmp_path} does not do O_DIRECT")
    if probe is not None:
        os.close(probe)
    monkeypatch.setattr(dcp_writer, "_open_direct", spying_open)
    read_back: list[str] = []
    real_digest = manifest_module.file_digest

    def counting_digest(path: Path) -> str:
        read_back.append(path.name)
        return real_digest(path)

    monkeypatch.setattr(manifest_module, "file_digest", counting_digest)
    path = _save(CheckpointManager(tmp_path / "ckpt", direct_io=direct))
    monkeypatch.undo()

    assert len(opened) == (2 if direct else 0) and all((fd is not None) == direct for fd in opened)
    manifest = Manifest.read(path)
    data_files = sorted(n for n in manifest.files if n.endswith(".distcp"))
    assert len(data_files) == 2  # written side by side by two writer threads
    assert not set(read_back) & set(data_files)  # digested while written, never read back
    for name, entry in manifest.files.items():
        assert entry["xxh3_128"] == _xxh3_of(path / name), name
        assert entry["bytes"] == (path / name).stat().st_size, name
        assert name not in data_files or entry["bytes"] % 4096 != 0  # a tail was written
    verify_dir(path)


def _o_direct_or_skip(directory: Path) -> None:
    probe = dcp_writer._open_direct(directory / "probe")
    if probe is None:
        pytest.skip(f"{directory} does not do O_DIRECT")
    os.close(probe)
    (directory / "probe").unlink()


@pytest.mark.parametrize("where", ["staged", "unaligned"])
def test_large_tensors_go_from_the_staging_buffers_to_the_file_uncopied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    _o_direct_or_skip(tmp_path)
    torch.manual_seed(0)
    state = {
        "model.big": torch.randn(100_003),  # 400,012 bytes: whole blocks and a tail
        "model.small": torch.randn(7),
        "optimizer.state.big.exp_avg": torch.randn(300, 301),
        "model.edge": torch.randn(16_384),  # 64 KiB exactly
        "extra.count": torch.tensor(5),
    }
    big = ["model.big", "optimizer.state.big.exp_avg", "model.edge"]
    if where == "staged":
        tensors = StagingBuffers().copy(state)
    else:  # each tensor its own storage, 8 bytes past a page: no in-place write
        tensors = {}
        for key, value in state.items():
            memory = np.empty(value.nbytes + 4096 + 8, dtype=np.uint8)
            start = -memory.ctypes.data % 4096 + 8
            own = torch.from_numpy(memory[start : start + value.nbytes]).view(value.dtype).view(value.shape)
            tensors[key] = own.copy_(value)
    in_place: list[int] = []
    real = dcp_writer._DirectSink._write_in_place

    def spying(sink: Any, view: memoryview) -> None:
        in_place.append(len(view))
        real(sink, view)

    monkeypatch.setattr(dcp_writer._DirectSink, "_write_in_place", spying)
    monkeypatch.setattr(dcp_writer, "PIECE", 64 << 10)  # several pieces per tensor, the bounce refilled
    writer = dcp_writer.DigestingWriter(tmp_path / "c", direct=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(layout.nested(tensors), storage_writer=writer, no_dist=True)
    monkeypatch.undo()

    if where == "staged":
        assert sorted(in_place) == sorted(state[k].nbytes for k in big)
    else:
        assert in_place == []
    for name, entry in writer.digests.items():
        assert entry["xxh3_128"] == _xxh3_of(tmp_path / "c" / name)
        assert entry["bytes"] == (tmp_path / "c" / name).stat().st_size
    loaded = layout.nested({k: torch.zeros_like(v) for k, v in state.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    flat = {**{f"model.{k}": v for k, v in loaded["model"].items()}, "extra.count": loaded["extra"]["count"]}
    flat["optimizer.state.big.exp_avg"] = loaded["optimizer"]["state"]["big"]["exp_avg"]
    assert all(torch.equal(flat[k], v) for k, v in state.items())
    metadata = SafeFileSystemReader(tmp_path / "c").read_metadata()
    for index, info in metadata.storage_data.items():  # each record says the alignment it was written with
        with open(tmp_path / "c" / info.relative_path, "rb") as f:
            f.seek(info.offset)
            record = torch._C.PyTorchFileReader(io.BytesIO(f.read(info.length)))
        aligned = index.fqn in big  # a block-aligned record whether or not its bytes were in place
        assert record.get_record(".storage_alignment") == (b"4096" if aligned else b"64"), index.fqn
        assert info.offset % 4096 == 0 or not aligned, index.fqn


def test_a_filesystem_that_opens_with_o_direct_but_refuses_its_writes_gets_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _o_direct_or_skip(tmp_path)
    real_pwrite = os.pwrite
    refused: list[int] = []

    def refusing(fd: int, data: Any, offset: int) -> int:  # as a filesystem with an alignment of its own
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    monkeypatch.setattr(dcp_writer, "PIECE", 4096)  # many writes per file after the first
    with caplog.at_level(logging.WARNING, logger=dcp_writer.__name__):
        path = _save(CheckpointManager(tmp_path / "ckpt", direct_io=True))
    monkeypatch.undo()

    assert len(refused) == 2  # the first write of each data file, once
    assert sum("O_DIRECT writes refused" in r.getMessage() for r in caplog.records) == 2
    verify_dir(path)
    model, _ = _state()
    loaded = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": loaded}, checkpoint_id=str(path), no_dist=True)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("which", [0, 1])
def test_a_byte_flipped_in_either_data_file_is_found(tmp_path: Path, which: int) -> None:
    path = _save(CheckpointManager(tmp_path / "ckpt"))
    target = path / f"__0_{which}.distcp"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=target.name):
        verify_dir(path)


def test_every_record_is_a_plain_torch_save_of_the_tensor(tmp_path: Path) -> None:
    model, _ = _state()
    path = _save(CheckpointManager(tmp_path / "ckpt"))
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    seen = 0
    for index, info in metadata.storage_data.items():
        if not index.fqn.startswith("model."):
            continue
        with open(path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            record = f.read(info.length)
        tensor = torch.load(io.BytesIO(record), weights_only=True)
        assert torch.equal(tensor, model.state_dict()[index.fqn.removeprefix("model.")]), index.fqn
        seen += 1
    assert seen == len(model.state_dict())
    loaded = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": loaded}, checkpoint_id=str(path), no_dist=True)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_digest_whose_size_differs_from_the_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.distcp").write_bytes(b"12345")
    known = {"a.distcp": {"xxh3_128": "0" * 32, "bytes": 4}}
    with pytest.raises(OSError, match="4 bytes written, 5 on disk"):
        checksum_files(tmp_path, known)
    known["a.distcp"]["bytes"] = 5
    assert checksum_files(tmp_path, known)["a.distcp"]["xxh3_128"] == "0" * 32


def test_an_error_in_a_writer_thread_fails_the_save_and_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(tmp_path / "ckpt")
    first = _save(manager, 1)
    real = records.RecordTemplates.write
    calls = [0]

    def failing(self: Any, tensor: torch.Tensor, stream: Any, alignment: int | None = None) -> None:
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(5, "Input/output error")
        real(self, tensor, stream, alignment)

    monkeypatch.setattr(records.RecordTemplates, "write", failing)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        _save(manager, 2)
    assert manager.store.committed() == [first]
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == first.name


def test_async_saves_delete_old_checkpoints_after_the_commit(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    checkpointer = AsyncCheckpointer(manager)
    model, optimizer = _state()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rng = ADAPTER.get_rng_state(torch.device("cpu"))
    paths = []
    for step in (1, 2, 3):
        future = checkpointer.save(
            capture(model, optimizer, scaler), rng, ADAPTER, TrainingProgress(step, step, 1, 0), {}
        )
        paths.append(future.result(timeout=60))
        checkpointer.wait()
        assert manager.store.committed() == [paths[-1]]
    checkpointer.close()
    assert [p.name for p in paths] == ["step_000000001", "step_000000002", "step_000000003"]


def test_a_view_is_written_as_its_own_bytes_only(tmp_path: Path) -> None:
    big = torch.arange(1 << 20, dtype=torch.float32)
    writer = dcp_writer.DigestingWriter(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"extra": {"v": big[10:20]}}, storage_writer=writer, no_dist=True)
    assert sum(entry["bytes"] for entry in writer.digests.values()) < 4096
    loaded = {"extra": {"v": torch.zeros(10)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    assert torch.equal(loaded["extra"]["v"], big[10:20])


def _kinds() -> list[tuple[str, torch.Tensor, int | None]]:
    square = torch.randn(64, 64)
    return [
        ("fp32 on a block", torch.randn(64, 64), dcp_writer.BLOCK),
        ("bf16", torch.randn(300).to(torch.bfloat16), None),
        ("0-dim int64", torch.tensor(7), None),
        ("empty", torch.zeros(0, 3), None),
        ("transposed", square.t(), None),
        ("requires grad", torch.randn(5, requires_grad=True), dcp_writer.BLOCK),
    ]


@pytest.mark.parametrize("name", [k[0] for k in _kinds()])
def test_a_record_written_from_its_template_is_the_serialisers_bytes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, first, alignment = next(k for k in _kinds() if k[0] == name)
    real, serialised = records.save_record, [0]

    def counted(tensor: torch.Tensor, stream: Any, alignment: int | None = None) -> None:
        serialised[0] += 1
        real(tensor, stream, alignment)

    templates = records.RecordTemplates()
    # Same kind, other data: the second and third reuse the first one's bytes around their own data.
    others = [(first.detach() * 3 + 1).to(first.dtype), (first.detach() - 2).to(first.dtype)]
    others = [o.t().contiguous().t() if not first.is_contiguous() else o for o in others]
    for tensor in [first, *[o.requires_grad_(first.requires_grad) for o in others]]:
        expected, written = io.BytesIO(), io.BytesIO()
        real(tensor, expected, alignment)
        monkeypatch.setattr(records, "save_record", counted)
        templates.write(tensor, written, alignment)
        monkeypatch.setattr(records, "save_record", real)
        assert written.getvalue() == expected.getvalue()
        loaded = torch.load(io.BytesIO(written.getvalue()), weights_only=True)
        assert torch.equal(loaded, tensor.detach()) and loaded.stride() == tensor.stride()
    assert serialised[0] == 1  # torch's serialiser ran for the first of the kind only


def test_tensors_whose_record_may_say_more_are_serialised_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    real, serialised = records.save_record, [0]

    def counted(tensor: torch.Tensor, stream: Any, alignment: int | None = None) -> None:
        serialised[0] += 1
        real(tensor, stream, alignment)

    monkeypatch.setattr(records, "save_record", counted)
    big = torch.arange(100.0)
    tagged = torch.randn(4)
    tagged.note = "an attribute the pickle carries"  # type: ignore[attr-defined]
    templates = records.RecordTemplates()
    conjugate = torch.randn(3, dtype=torch.complex64)
    tensors = [big[10:20], big[30:40], torch.nn.Parameter(torch.randn(3)), tagged, tagged]
    loaded = []
    for tensor in [*tensors, conjugate.conj(), conjugate.conj()]:
        stream = io.BytesIO()
        templates.write(tensor, stream)
        loaded.append(torch.load(io.BytesIO(stream.getvalue()), weights_only=True))
        assert torch.equal(loaded[-1], tensor.detach())
    assert serialised[0] == 7
    assert loaded[4].note == "an attribute the pickle carries"


def test_a_stream_that_fails_mid_record_raises_and_does_not_abort() -> None:
    # A full disk mid-record: the error reaches the caller, and collecting the half-written record later
    # must not take the process down (run apart, since an abort would end the test session).
    code = """
import gc, io, torch
from trainer.checkpoint.records import save_record

class Full(io.RawIOBase):
    def __init__(self): self.n = 0
    def writable(self): return True
    def write(self, b):
        self.n += len(b)
        if self.n > 2000: raise OSError(28, "No space left on device")
        return len(b)

try:
    save_record(torch.randn(10000), Full())
except OSError as exc:
    assert exc.errno == 28, exc
else:
    raise AssertionError("no error")
gc.collect()
print("survived")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]
