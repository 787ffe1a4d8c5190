"""Damaged, hostile and half-written checkpoints: found before a tensor is trusted, never loaded, never changed.

Every test writes real checkpoints of a small GPT with the real CheckpointManager, damages them on disk the
way a crash, a bad disk or an attacker would, and checks which checkpoint ``restore`` picks, that the
parameters it puts back are bitwise the ones saved at that step, and what the warning or error names.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.checkpoint import CheckpointManager, Manifest
from trainer.checkpoint.manifest import MANIFEST_NAME
from trainer.checkpoint.safe_dcp import SafeFileSystemReader
from trainer.errors import NoCheckpointError
from trainer.testing.checkpoint_pairs import (
    DATA_FILE,
    METADATA_FILE,
    NEWER,
    OLDER,
    Pair,
    assert_bitwise_equal,
    assert_fell_back,
    copy_pair,
    file_tree,
    flip_byte,
    make_trainee,
    reseal,
    restore_into,
    save_at,
    snapshot,
    train_once,
    truncate,
)


# --- damage the manifest can see ----------------------------------------------------------------------
def test_flipped_byte_in_data_file_is_skipped_and_previous_restored_bitwise(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    data = pair.newer / DATA_FILE
    flip_byte(data, data.stat().st_size // 2, 0x01)

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        restored, trainee = restore_into(pair.root)

    reason = assert_fell_back(pair, restored, trainee)
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
        lambda d: truncate(d / DATA_FILE, (d / DATA_FILE).stat().st_size - 7),
        DATA_FILE,
        ("truncated",),
    ),
    "data_emptied": (lambda d: truncate(d / DATA_FILE, 0), DATA_FILE, ("0 bytes", "truncated")),
    "metadata_flipped": (
        lambda d: flip_byte(d / METADATA_FILE, 100),
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

    restored, trainee = restore_into(pair.root)

    reason = assert_fell_back(pair, restored, trainee)
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
    trainee = make_trainee()
    save_at(manager, trainee, OLDER)
    train_once(trainee)
    newest, newest_state = save_at(manager, trainee, NEWER)
    train_once(trainee)
    deleted, _ = save_at(manager, trainee, 9)  # latest -> step 9, which is then deleted by hand
    shutil.rmtree(deleted)
    (root / "latest").write_bytes(pointer)

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        restored, into = restore_into(root)

    assert restored is not None and restored.path == newest and restored.skipped == []
    assert_bitwise_equal(snapshot(into), newest_state)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(root / "latest") in m for m in warned), warned


# --- nothing loadable -------------------------------------------------------------------------------------
def test_every_checkpoint_damaged_raises_listing_them_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root)
    trainee = make_trainee()
    paths = []
    for step in (2, 4, 6):
        paths.append(save_at(manager, trainee, step)[0])
        train_once(trainee)
    flip_byte(paths[2] / DATA_FILE, 10)
    (paths[1] / MANIFEST_NAME).unlink()
    truncate(paths[0] / DATA_FILE, 100)
    before = file_tree(root)
    into = make_trainee(seed=1234)
    live = snapshot(into)

    with pytest.raises(NoCheckpointError) as info:
        restore_into(root, into)

    message = str(info.value)
    for path, why in zip(
        paths, ("truncated", "manifest missing", "does not match the manifest"), strict=True
    ):
        assert path.name in message and why in message
    assert file_tree(root) == before, "a failed restore must not delete or modify any file"
    assert_bitwise_equal(snapshot(into), live)


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
        restore_into(pair.root)


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

    restored, trainee = restore_into(pair.root)

    reason = assert_fell_back(pair, restored, trainee)
    assert str(pair.newer / MANIFEST_NAME) in reason


# --- properties ---------------------------------------------------------------------------------------------
@contextmanager
def _copied_pair(template: Pair) -> Iterator[Pair]:
    """A private copy of the template pair in a fresh directory (tmp_path is shared by all examples)."""
    with tempfile.TemporaryDirectory(prefix="ckpt-integrity-") as workdir:
        yield copy_pair(template, Path(workdir))


def _assert_never_loads_newer(pair: Pair, keep_older: bool) -> None:
    """Restore returns the older checkpoint, or raises NoCheckpointError when there is none; nothing else."""
    if not keep_older:
        shutil.rmtree(pair.older)
    try:
        restored, trainee = restore_into(pair.root)
    except NoCheckpointError as exc:
        assert not keep_older, f"the good older checkpoint was not found: {exc}"
        assert pair.newer.name in str(exc)
        return
    assert keep_older, "a damaged checkpoint was loaded"
    assert_fell_back(pair, restored, trainee)


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
            truncate(path, offset)
        else:
            flip_byte(path, offset, mask)
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
            truncate(path, offset)
        else:
            flip_byte(path, offset, mask)
        reseal(pair.newer)
        if mask is None:
            _assert_never_loads_newer(pair, keep_older)
            return
        if not keep_older:
            shutil.rmtree(pair.older)
        try:
            restored, _ = restore_into(pair.root)
        except NoCheckpointError:
            assert not keep_older
            return
        assert restored is not None
        assert restored.path == pair.newer or (keep_older and restored.path == pair.older)
