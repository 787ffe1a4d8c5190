"""Saves that fail, crash or repeat a step, retention, and a checkpoint of another model: nothing is
overwritten, nothing half-written is ever loaded, a misfit names what differs and changes nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainer.checkpoint import CheckpointManager, Manifest
from trainer.checkpoint import manager as manager_module
from trainer.errors import CheckpointIncompatibleError
from trainer.testing.checkpoint_pairs import (
    Pair,
    assert_bitwise_equal,
    file_tree,
    make_trainee,
    restore_into,
    save_at,
    snapshot,
    train_once,
)


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
    before = file_tree(pair.root)
    other = make_trainee(seed=7, **overrides)
    live = snapshot(other)

    with pytest.raises(CheckpointIncompatibleError) as info:
        restore_into(pair.root, other)

    message = str(info.value)
    assert str(pair.newer) in message, (
        "fatal at the newest: an older checkpoint of the run would not fit either"
    )
    for text in expected:
        assert text in message
    assert file_tree(pair.root) == before
    assert_bitwise_equal(snapshot(other), live)


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
    before = file_tree(pair.root)
    if target == "checksum_files":
        monkeypatch.setattr(manager_module, "checksum_files", _fail(exc))
    elif target == "write_rng":
        monkeypatch.setattr(manager_module.rng_io, "write_rng", _fail(exc))
    else:
        monkeypatch.setattr(Manifest, "write", _fail(exc))
    trainee = make_trainee(seed=5)

    with pytest.raises(type(exc)):
        save_at(CheckpointManager(pair.root), trainee, 9)

    assert file_tree(pair.root) == before
    assert not list(pair.root.glob(".tmp-*"))
    assert (pair.root / "latest").read_text().strip() == pair.newer.name
    monkeypatch.undo()
    restored, into = restore_into(pair.root)
    assert restored is not None and restored.path == pair.newer
    assert_bitwise_equal(snapshot(into), pair.newer_state)


def test_crash_leftovers_are_removed_and_never_loaded(pair: Pair) -> None:
    manager = CheckpointManager(pair.root)
    trainee = make_trainee(seed=5)
    crashed, _ = save_at(manager, trainee, 9)
    # As if the process died before the rename: a complete directory under its private name, latest unmoved.
    tmp = pair.root / ".tmp-step_000000009-deadbeef"
    os.rename(crashed, tmp)
    (pair.root / "latest").write_text(pair.newer.name + "\n")
    trash = pair.root / ".trash-step_000000001-cafef00d"
    shutil.copytree(pair.older, trash)  # a retention deletion that died half-way
    (pair.root / ".latest.0badc0de").write_text(crashed.name + "\n")  # a pointer update that died

    restored, into = restore_into(pair.root)

    assert restored is not None and restored.path == pair.newer and restored.skipped == []
    assert_bitwise_equal(snapshot(into), pair.newer_state)
    assert sorted(p.name for p in pair.root.iterdir()) == sorted(["latest", pair.older.name, pair.newer.name])


def test_same_step_saved_twice_gets_a_suffix_and_first_is_untouched(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root)
    trainee = make_trainee()
    first, _ = save_at(manager, trainee, 5)
    first_files = file_tree(first)
    train_once(trainee)

    second, second_state = save_at(manager, trainee, 5)
    third, _ = save_at(manager, trainee, 5)

    assert (first.name, second.name, third.name) == ("step_000000005", "step_000000005.1", "step_000000005.2")
    assert file_tree(first) == first_files
    assert (root / "latest").read_text().strip() == third.name
    shutil.rmtree(third)
    restored, into = restore_into(root)  # latest now dangles; the newest suffix of step 5 wins
    assert restored is not None and restored.path == second
    assert_bitwise_equal(snapshot(into), second_state)


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=2)
    trainee = make_trainee()
    for step in (1, 2, 3, 4):
        path, state = save_at(manager, trainee, step)
        train_once(trainee)

    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000000003", "step_000000004"]
    assert (root / "latest").read_text().strip() == "step_000000004"
    restored, into = restore_into(root)
    assert restored is not None and restored.path == path
    assert_bitwise_equal(snapshot(into), state)
