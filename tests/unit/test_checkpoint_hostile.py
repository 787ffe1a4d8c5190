"""Hostile checkpoints: a pickle planted in DCP's metadata is refused before it can run code.

Each payload is first shown to run code under plain ``pickle`` (a control), then refused by the reader.
"""

from __future__ import annotations

import os
import pickle
import random
import shlex
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.checkpoint import CheckpointManager, Manifest
from trainer.checkpoint.safe_dcp import SafeFileSystemReader, load_metadata
from trainer.errors import CheckpointCorruptError, NoCheckpointError, UnsafeCheckpointError
from trainer.testing.checkpoint_pairs import (
    METADATA_FILE,
    OLDER,
    Pair,
    assert_fell_back,
    make_trainee,
    reseal,
    restore_into,
    save_at,
)


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
    reseal(pair.newer)
    Manifest.read(pair.newer).verify_files(pair.newer)  # the manifest no longer protects against it

    restored, trainee = restore_into(pair.root)

    reason = assert_fell_back(pair, restored, trainee)
    assert "refusing" in reason and str(metadata) in reason
    with pytest.raises(UnsafeCheckpointError):
        SafeFileSystemReader(pair.newer).read_metadata()
    assert not marker.exists(), "the hostile pickle ran code"


def test_only_checkpoint_hostile_raises_no_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path, _ = save_at(CheckpointManager(tmp_path / "ckpt"), make_trainee(), OLDER)
    (path / METADATA_FILE).write_bytes(_payload("os_system", marker, b""))
    reseal(path)

    with pytest.raises(NoCheckpointError, match="refusing") as info:
        restore_into(tmp_path / "ckpt")

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
