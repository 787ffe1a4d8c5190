"""Damaged, hostile and half-written checkpoints: found before a tensor is trusted, never loaded, never changed.

Every test writes real checkpoints of a small GPT with the real CheckpointManager, damages them on disk the
way a crash, a bad disk or an attacker would, and checks which checkpoint ``restore`` picks, that the
parameters it puts back are bitwise the ones saved at that step, and what the warning or error names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shlex
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.checkpoint import CheckpointManager, Manifest, Restored, TrainingProgress
from trainer.checkpoint import manager as manager_module
from trainer.checkpoint import state as portable
from trainer.checkpoint.manifest import MANIFEST_NAME, checksum_files
from trainer.checkpoint.safe_dcp import SafeFileSystemReader, load_metadata
from trainer.devices import get_adapter
from trainer.errors import (
    CheckpointCorruptError,
    CheckpointIncompatibleError,
    NoCheckpointError,
    UnsafeCheckpointError,
)
from trainer.model import GPT

ADAPTER = get_adapter("cpu")
DEVICE = ADAPTER.bind(0)
DATA_FILE = "__0_0.distcp"
METADATA_FILE = ".metadata"
MODEL = {"vocab_size": 32, "seq_len": 8, "n_layer": 1, "n_head": 2, "n_embd": 16}
OLDER, NEWER = 3, 6


# --- helpers ------------------------------------------------------------------------------------------
@dataclass
class Trainee:
    model: GPT
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler


def _trainee(seed: int = 0, **model_overrides: int) -> Trainee:
    """A small GPT with AdamW after one real step, so the optimizer has state to save."""
    torch.manual_seed(seed)
    model = GPT(**{**MODEL, **model_overrides})
    trainee = Trainee(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.amp.GradScaler("cpu", enabled=False)
    )
    _train(trainee)
    return trainee


def _train(trainee: Trainee) -> None:
    vocab = trainee.model.tok_emb.num_embeddings
    tokens = torch.randint(0, vocab, (2, trainee.model.seq_len + 1))
    logits = trainee.model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainee.optimizer.step()


def _snapshot(trainee: Trainee) -> dict[str, torch.Tensor]:
    """Copies of every parameter, buffer and optimizer state tensor, keyed by parameter name."""
    out = {f"model/{k}": v.detach().clone() for k, v in trainee.model.state_dict().items()}
    for name, param in trainee.model.named_parameters():
        for key, value in trainee.optimizer.state[param].items():
            out[f"optim/{name}/{key}"] = value.detach().clone()
    return out


def _assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.contiguous().numpy().tobytes() == want.contiguous().numpy().tobytes(), key


def _save(manager: CheckpointManager, trainee: Trainee, step: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """Commit a checkpoint of ``trainee`` at ``step``; returns its directory and what it holds."""
    progress = TrainingProgress(step=step, samples_seen=2 * step, world_size=1, seed=0)
    path = manager.save(
        portable.capture(trainee.model, trainee.optimizer, trainee.scaler),
        ADAPTER.get_rng_state(DEVICE),
        ADAPTER,
        progress,
        config={},
    )
    return path, _snapshot(trainee)


def _restore(root: Path, into: Trainee | None = None) -> tuple[Restored | None, Trainee]:
    """Restore ``root`` into a freshly built model (different weights from any saved one)."""
    trainee = into or _trainee(seed=1234)
    restored = CheckpointManager(root).restore(
        trainee.model, trainee.optimizer, trainee.scaler, ADAPTER, DEVICE
    )
    return restored, trainee


def _tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256 | "<dir>"}`` of everything under ``root``, hidden files included."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _reseal(directory: Path) -> None:
    """Recompute the manifest's file checksums, as an attacker who edits a checkpoint would."""
    manifest = Manifest.read(directory)
    manifest.files = checksum_files(directory)
    manifest.write(directory)


def _flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@dataclass
class Pair:
    """Two committed checkpoints of one run: ``older`` (step 3) and ``newer`` (step 6, ``latest``)."""

    root: Path
    older: Path
    older_state: dict[str, torch.Tensor]
    newer: Path
    newer_state: dict[str, torch.Tensor]


def _make_pair(root: Path) -> Pair:
    manager = CheckpointManager(root)
    trainee = _trainee()
    older, older_state = _save(manager, trainee, OLDER)
    _train(trainee)
    newer, newer_state = _save(manager, trainee, NEWER)
    return Pair(root, older, older_state, newer, newer_state)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return _make_pair(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def pair_template(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """A pair written once, copied per hypothesis example."""
    return _make_pair(tmp_path_factory.mktemp("template") / "ckpt")


def _copy_pair(template: Pair, workdir: Path) -> Pair:
    root = workdir / "ckpt"
    shutil.copytree(template.root, root)
    return Pair(
        root,
        root / template.older.name,
        template.older_state,
        root / template.newer.name,
        template.newer_state,
    )


def _assert_fell_back(pair: Pair, restored: Restored | None, trainee: Trainee) -> str:
    """The older checkpoint was restored bitwise and the newer one skipped; returns the skip reason."""
    assert restored is not None
    assert restored.path == pair.older
    assert restored.manifest.step == OLDER
    assert [p for p, _ in restored.skipped] == [pair.newer]
    _assert_bitwise_equal(_snapshot(trainee), pair.older_state)
    return restored.skipped[0][1]


# --- damage the manifest can see ----------------------------------------------------------------------
def test_flipped_byte_in_data_file_is_skipped_and_previous_restored_bitwise(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    data = pair.newer / DATA_FILE
    _flip(data, data.stat().st_size // 2, 0x01)

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        restored, trainee = _restore(pair.root)

    reason = _assert_fell_back(pair, restored, trainee)
    assert str(data) in reason
    assert "does not match the manifest (damaged)" in reason  # the file checksum, whichever hash it uses
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(pair.newer) in m and str(data) in m for m in warned), warned


def _edit_manifest_step(directory: Path) -> None:
    body = json.loads((directory / MANIFEST_NAME).read_text())
    body["step"] = OLDER  # manifest_sha256 left as it was
    (directory / MANIFEST_NAME).write_text(json.dumps(body))


def _reseal_with_other_step(directory: Path) -> None:
    manifest = Manifest.read(directory)
    manifest.step = 99
    manifest.write(directory)  # a self-consistent manifest that does not belong to this directory


def _drop(rel: str) -> Callable[[Path], None]:
    def drop(directory: Path) -> None:
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(b"not part of this checkpoint")

    return drop


DAMAGE: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    # id: (damage, file the reason must name, words the reason must contain)
    "data_truncated": (
        lambda d: _truncate(d / DATA_FILE, (d / DATA_FILE).stat().st_size - 7),
        DATA_FILE,
        ("truncated",),
    ),
    "data_emptied": (lambda d: _truncate(d / DATA_FILE, 0), DATA_FILE, ("0 bytes", "truncated")),
    "metadata_flipped": (
        lambda d: _flip(d / METADATA_FILE, 100),
        METADATA_FILE,
        ("does not match the manifest (damaged)",),
    ),
    "rng_missing": (
        lambda d: (d / "rng" / "rank_00000.json").unlink(),
        "",
        ("missing", "rng/rank_00000.json"),
    ),
    "manifest_missing": (lambda d: (d / MANIFEST_NAME).unlink(), MANIFEST_NAME, ("manifest missing",)),
    "manifest_step_edited": (_edit_manifest_step, MANIFEST_NAME, ("checksum mismatch",)),
    "manifest_not_json": (
        lambda d: (d / MANIFEST_NAME).write_text("{not json"),
        MANIFEST_NAME,
        ("unreadable",),
    ),
    "manifest_empty": (lambda d: (d / MANIFEST_NAME).write_bytes(b""), MANIFEST_NAME, ("unreadable",)),
    "manifest_binary": (
        lambda d: (d / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00"),
        MANIFEST_NAME,
        ("unreadable",),
    ),
    "manifest_not_object": (
        lambda d: (d / MANIFEST_NAME).write_text("[1, 2]"),
        MANIFEST_NAME,
        ("not a JSON object",),
    ),
    "manifest_resealed_other_step": (_reseal_with_other_step, "", ("does not match manifest step 99",)),
    "extra_file": (_drop("evil.pt"), "", ("not listed in the manifest", "evil.pt")),
    "extra_rank_file": (
        _drop("rng/rank_00001.json"),
        "",
        ("not listed in the manifest", "rng/rank_00001.json"),
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_is_detected_and_previous_restored(pair: Pair, damage: str) -> None:
    apply, file, words = DAMAGE[damage]
    apply(pair.newer)

    restored, trainee = _restore(pair.root)

    reason = _assert_fell_back(pair, restored, trainee)
    assert str(pair.newer / file) in reason
    for word in words:
        assert word in reason


# --- the latest pointer ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pointer",
    [b"step_000000009\n", b"garbage text \xe2\x98\x83\n", b"\xff\xfe\x00\x01", b"../step_000000006\n", b""],
    ids=["deleted_dir", "garbage", "not_utf8", "escapes_root", "empty"],
)
def test_dangling_latest_pointer_warns_and_newest_good_is_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, pointer: bytes
) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root)
    trainee = _trainee()
    _save(manager, trainee, OLDER)
    _train(trainee)
    newest, newest_state = _save(manager, trainee, NEWER)
    _train(trainee)
    deleted, _ = _save(manager, trainee, 9)  # latest -> step 9, which is then deleted by hand
    shutil.rmtree(deleted)
    (root / "latest").write_bytes(pointer)

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        restored, into = _restore(root)

    assert restored is not None and restored.path == newest and restored.skipped == []
    _assert_bitwise_equal(_snapshot(into), newest_state)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(root / "latest") in m for m in warned), warned


# --- nothing loadable -------------------------------------------------------------------------------------
def test_every_checkpoint_damaged_raises_listing_them_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root)
    trainee = _trainee()
    paths = []
    for step in (2, 4, 6):
        paths.append(_save(manager, trainee, step)[0])
        _train(trainee)
    _flip(paths[2] / DATA_FILE, 10)
    (paths[1] / MANIFEST_NAME).unlink()
    _truncate(paths[0] / DATA_FILE, 100)
    before = _tree(root)
    into = _trainee(seed=1234)
    live = _snapshot(into)

    with pytest.raises(NoCheckpointError) as info:
        _restore(root, into)

    message = str(info.value)
    for path, why in zip(
        paths, ("truncated", "manifest missing", "does not match the manifest"), strict=True
    ):
        assert path.name in message and why in message
    assert _tree(root) == before, "a failed restore must not delete or modify any file"
    _assert_bitwise_equal(_snapshot(into), live)


# --- what is not damage ------------------------------------------------------------------------------------
class _Preempted(BaseException):
    """What a scheduler's SIGTERM handler raises to stop a process (not an Exception, like KeyboardInterrupt)."""


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, _Preempted])
def test_interrupt_while_reading_tensors_propagates(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise interrupt()

    monkeypatch.setattr(SafeFileSystemReader, "read_data", interrupted)

    with pytest.raises(interrupt):
        _restore(pair.root)


def _malformed(edit: Callable[[Manifest], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        manifest = Manifest.read(directory)
        edit(manifest)
        manifest.write(directory)  # self-checksum recomputed: only the field types are wrong

    return apply


MALFORMED: dict[str, Callable[[Path], None]] = {
    "files_null": _malformed(lambda m: setattr(m, "files", None)),
    "file_entry_null": _malformed(lambda m: m.files.__setitem__(DATA_FILE, None)),
    "tensors_null": _malformed(lambda m: setattr(m, "tensors", None)),
    "tensor_entry_list": _malformed(lambda m: m.tensors.__setitem__("model.head.weight", [32, 16])),
    "history_null": _malformed(lambda m: setattr(m, "history", None)),
}


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_self_consistent_manifest_with_wrong_types_is_skipped(pair: Pair, damage: str) -> None:
    MALFORMED[damage](pair.newer)

    restored, trainee = _restore(pair.root)

    reason = _assert_fell_back(pair, restored, trainee)
    assert str(pair.newer / MANIFEST_NAME) in reason


# --- hostile checkpoints ------------------------------------------------------------------------------------
class _RunsCode:
    """Pickles as the call ``func(*args)``: what an attacker plants in a pickle-based checkpoint file."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _payload(kind: str, marker: Path, genuine: bytes) -> bytes:
    """A pickle that creates ``marker`` when unpickled by ``pickle.loads``."""
    if kind == "os_system":
        return pickle.dumps(_RunsCode(os.system, f"touch {shlex.quote(str(marker))}"))
    if kind == "builtins_exec":
        return pickle.dumps(_RunsCode(exec, f"open({str(marker)!r}, 'w').write('pwned')"))
    if kind == "inside_real_metadata":
        metadata = load_metadata(genuine, "genuine")
        metadata.planner_data = _RunsCode(os.system, f"touch {shlex.quote(str(marker))}")
        return pickle.dumps(metadata)
    if kind == "dotted_name_in_allowed_module":
        # pathlib is allowed for PosixPath; "Path.write_text" resolves to a method through the same module.
        return b"".join(
            [
                pickle.PROTO + b"\x04",
                _unicode("pathlib") + _unicode("Path.write_text") + pickle.STACK_GLOBAL,
                _unicode("pathlib") + _unicode("PosixPath") + pickle.STACK_GLOBAL,
                _unicode(str(marker)) + pickle.TUPLE1 + pickle.REDUCE,
                _unicode("pwned") + pickle.TUPLE2 + pickle.REDUCE,
                pickle.STOP,
            ]
        )
    raise AssertionError(kind)


PAYLOADS = ["os_system", "builtins_exec", "inside_real_metadata", "dotted_name_in_allowed_module"]


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live_under_plain_pickle(pair: Pair, tmp_path: Path, kind: str) -> None:
    """Control: each payload really runs code when unpickled naively, so the tests below prove something."""
    control = tmp_path / "control"
    pickle.loads(_payload(kind, control, (pair.newer / METADATA_FILE).read_bytes()))
    assert control.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_hostile_metadata_is_refused_and_previous_restored(pair: Pair, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    metadata = pair.newer / METADATA_FILE
    metadata.write_bytes(_payload(kind, marker, metadata.read_bytes()))
    _reseal(pair.newer)
    Manifest.read(pair.newer).verify_files(pair.newer)  # the manifest no longer protects against it

    restored, trainee = _restore(pair.root)

    reason = _assert_fell_back(pair, restored, trainee)
    assert "refusing" in reason and str(metadata) in reason
    with pytest.raises(UnsafeCheckpointError):
        SafeFileSystemReader(pair.newer).read_metadata()
    assert not marker.exists(), "the hostile pickle ran code"


def test_only_checkpoint_hostile_raises_no_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path, _ = _save(CheckpointManager(tmp_path / "ckpt"), _trainee(), OLDER)
    (path / METADATA_FILE).write_bytes(_payload("os_system", marker, b""))
    _reseal(path)

    with pytest.raises(NoCheckpointError, match="refusing") as info:
        _restore(tmp_path / "ckpt")

    assert path.name in str(info.value)
    assert not marker.exists(), "the hostile pickle ran code"


@pytest.mark.parametrize("kind", PAYLOADS)
def test_load_metadata_refuses_code(pair: Pair, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = _payload(kind, marker, (pair.newer / METADATA_FILE).read_bytes())

    with pytest.raises(UnsafeCheckpointError, match="origin-file"):
        load_metadata(payload, "origin-file")

    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, CheckpointCorruptError)


def test_load_metadata_accepts_genuine_metadata(pair: Pair) -> None:
    """The allow-list is not so tight that real DCP metadata is refused."""
    metadata = load_metadata((pair.newer / METADATA_FILE).read_bytes(), "genuine")
    assert "model.tok_emb.weight" in metadata.state_dict_metadata


@settings(max_examples=60, deadline=None, database=None)
@given(st.binary(max_size=512) | st.integers(0, 2**31).map(lambda s: random.Random(s).randbytes(256)))
def test_load_metadata_on_random_bytes_raises_unsafe_only(data: bytes) -> None:
    with pytest.raises(UnsafeCheckpointError, match="random-file"):
        load_metadata(data, "random-file")


# --- checkpoints of another model -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"vocab_size": 48},
            [
                "shape mismatch",
                "model.tok_emb.weight: checkpoint [32, 16] vs model [48, 16]",
                "model.head.weight: checkpoint [32, 16] vs model [48, 16]",
                "optimizer.state.tok_emb.weight.exp_avg: checkpoint [32, 16] vs model [48, 16]",
            ],
        ),
        # Many keys differ; the message names the first eight (sorted) and the count.
        (
            {"n_embd": 32},
            ["shape mismatch", "model.blocks.0.attn.proj.bias: checkpoint [16] vs model [32]", "in all)"],
        ),
        ({"n_layer": 2}, ["missing", "model.blocks.1.attn.qkv.weight"]),
    ],
    ids=["vocab_size", "n_embd", "n_layer"],
)
def test_checkpoint_of_another_model_is_incompatible_and_untouched(
    pair: Pair, overrides: dict[str, int], expected: list[str]
) -> None:
    before = _tree(pair.root)
    other = _trainee(seed=7, **overrides)
    live = _snapshot(other)

    with pytest.raises(CheckpointIncompatibleError) as info:
        _restore(pair.root, other)

    message = str(info.value)
    assert str(pair.newer) in message, (
        "fatal at the newest: an older checkpoint of the run would not fit either"
    )
    for text in expected:
        assert text in message
    assert _tree(pair.root) == before
    _assert_bitwise_equal(_snapshot(other), live)


# --- atomic commit, leftovers, no overwrite, retention ---------------------------------------------------------
def _fail(exc: BaseException) -> Callable[..., Any]:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize(
    ("target", "exc"),
    [
        ("checksum_files", OSError(28, "No space left on device")),
        ("checksum_files", KeyboardInterrupt()),
        ("write_rng", OSError(5, "Input/output error")),
        ("manifest_write", RuntimeError("crash while sealing")),
    ],
    ids=["checksum_enospc", "checksum_interrupt", "rng_eio", "manifest_write"],
)
def test_failed_save_leaves_no_trace(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, target: str, exc: BaseException
) -> None:
    before = _tree(pair.root)
    if target == "checksum_files":
        monkeypatch.setattr(manager_module, "checksum_files", _fail(exc))
    elif target == "write_rng":
        monkeypatch.setattr(manager_module.rng_io, "write_rng", _fail(exc))
    else:
        monkeypatch.setattr(Manifest, "write", _fail(exc))
    trainee = _trainee(seed=5)

    with pytest.raises(type(exc)):
        _save(CheckpointManager(pair.root), trainee, 9)

    assert _tree(pair.root) == before
    assert not list(pair.root.glob(".tmp-*"))
    assert (pair.root / "latest").read_text().strip() == pair.newer.name
    monkeypatch.undo()
    restored, into = _restore(pair.root)
    assert restored is not None and restored.path == pair.newer
    _assert_bitwise_equal(_snapshot(into), pair.newer_state)


def test_crash_leftovers_are_removed_and_never_loaded(pair: Pair) -> None:
    manager = CheckpointManager(pair.root)
    trainee = _trainee(seed=5)
    crashed, _ = _save(manager, trainee, 9)
    # As if the process died before the rename: a complete directory under its private name, latest unmoved.
    tmp = pair.root / ".tmp-step_000000009-deadbeef"
    os.rename(crashed, tmp)
    (pair.root / "latest").write_text(pair.newer.name + "\n")
    trash = pair.root / ".trash-step_000000001-cafef00d"
    shutil.copytree(pair.older, trash)  # a retention deletion that died half-way
    (pair.root / ".latest.0badc0de").write_text(crashed.name + "\n")  # a pointer update that died

    restored, into = _restore(pair.root)

    assert restored is not None and restored.path == pair.newer and restored.skipped == []
    _assert_bitwise_equal(_snapshot(into), pair.newer_state)
    assert sorted(p.name for p in pair.root.iterdir()) == sorted(["latest", pair.older.name, pair.newer.name])


def test_same_step_saved_twice_gets_a_suffix_and_first_is_untouched(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root)
    trainee = _trainee()
    first, _ = _save(manager, trainee, 5)
    first_files = _tree(first)
    _train(trainee)

    second, second_state = _save(manager, trainee, 5)
    third, _ = _save(manager, trainee, 5)

    assert (first.name, second.name, third.name) == ("step_000000005", "step_000000005.1", "step_000000005.2")
    assert _tree(first) == first_files
    assert (root / "latest").read_text().strip() == third.name
    shutil.rmtree(third)
    restored, into = _restore(root)  # latest now dangles; the newest suffix of step 5 wins
    assert restored is not None and restored.path == second
    _assert_bitwise_equal(_snapshot(into), second_state)


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=2)
    trainee = _trainee()
    for step in (1, 2, 3, 4):
        path, state = _save(manager, trainee, step)
        _train(trainee)

    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000003", "step_000000004"]
    assert (root / "latest").read_text().strip() == "step_000000004"
    restored, into = _restore(root)
    assert restored is not None and restored.path == path
    _assert_bitwise_equal(_snapshot(into), state)


# --- properties ---------------------------------------------------------------------------------------------
@contextmanager
def _copied_pair(template: Pair) -> Iterator[Pair]:
    """A private copy of the template pair in a fresh directory (tmp_path is shared by all examples)."""
    with tempfile.TemporaryDirectory(prefix="ckpt-integrity-") as workdir:
        yield _copy_pair(template, Path(workdir))


def _assert_never_loads_newer(pair: Pair, keep_older: bool) -> None:
    """Restore returns the older checkpoint, or raises NoCheckpointError when there is none; nothing else."""
    if not keep_older:
        shutil.rmtree(pair.older)
    try:
        restored, trainee = _restore(pair.root)
    except NoCheckpointError as exc:
        assert not keep_older, f"the good older checkpoint was not found: {exc}"
        assert pair.newer.name in str(exc)
        return
    assert keep_older, "a damaged checkpoint was loaded"
    _assert_fell_back(pair, restored, trainee)


def _pick_file(directory: Path, index: int) -> Path:
    """One of the DCP files (data files, as many as the writer's threads, or ``.metadata``)."""
    files = [*sorted(directory.glob("*.distcp")), directory / METADATA_FILE]
    return files[index % len(files)]


@settings(max_examples=30, deadline=None, database=None)
@given(
    manifest=st.binary(max_size=2048)
    | st.text(max_size=200).map(str.encode)
    | st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8)).map(
        lambda d: json.dumps(d).encode()
    ),
    keep_older=st.booleans(),
)
def test_arbitrary_manifest_bytes_never_load(pair_template: Pair, manifest: bytes, keep_older: bool) -> None:
    with _copied_pair(pair_template) as pair:
        (pair.newer / MANIFEST_NAME).write_bytes(manifest)
        _assert_never_loads_newer(pair, keep_older)


@settings(max_examples=30, deadline=None, database=None)
@given(
    file=st.integers(0, 15),
    where=st.floats(0.0, 1.0, exclude_max=True),
    mask=st.none() | st.integers(1, 255),
    keep_older=st.booleans(),
)
def test_truncated_or_flipped_file_never_loads(
    pair_template: Pair, file: int, where: float, mask: int | None, keep_older: bool
) -> None:
    """``mask=None`` truncates the file at ``where`` (fraction of its size); otherwise XORs that byte."""
    with _copied_pair(pair_template) as pair:
        path = _pick_file(pair.newer, file)
        offset = int(where * path.stat().st_size)
        if mask is None:
            _truncate(path, offset)
        else:
            _flip(path, offset, mask)
        _assert_never_loads_newer(pair, keep_older)


@settings(max_examples=20, deadline=None, database=None)
@given(
    file=st.integers(0, 15),
    where=st.floats(0.0, 1.0, exclude_max=True),
    mask=st.none() | st.integers(1, 255),
    keep_older=st.booleans(),
)
def test_damage_behind_a_resealed_manifest_raises_only_checkpoint_errors(
    pair_template: Pair, file: int, where: float, mask: int | None, keep_older: bool
) -> None:
    """Damage the manifest cannot see (checksums recomputed after it) still surfaces as a CheckpointError.

    A truncated file can never be read; a flipped byte may land in tensor values, which only the manifest's
    checksum could have caught, so then the newer checkpoint may load.
    """
    with _copied_pair(pair_template) as pair:
        path = _pick_file(pair.newer, file)
        offset = int(where * path.stat().st_size)
        if mask is None:
            _truncate(path, offset)
        else:
            _flip(path, offset, mask)
        _reseal(pair.newer)
        if mask is None:
            _assert_never_loads_newer(pair, keep_older)
            return
        if not keep_older:
            shutil.rmtree(pair.older)
        try:
            restored, _ = _restore(pair.root)
        except NoCheckpointError:
            assert not keep_older
            return
        assert restored is not None
        assert restored.path == pair.newer or (keep_older and restored.path == pair.older)
