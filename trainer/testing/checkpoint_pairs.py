"""Two committed checkpoints of a small GPT and the tools to damage them, for the checkpoint-integrity tests.

Real checkpoints written by the real :class:`~trainer.checkpoint.CheckpointManager`; the damage helpers
change the files on disk as a crash, a bad disk or an attacker would.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.checkpoint import CheckpointManager, Manifest, Restored, TrainingProgress
from trainer.checkpoint import state as portable
from trainer.checkpoint.manifest import checksum_files
from trainer.devices import get_adapter
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


def make_trainee(seed: int = 0, **model_overrides: int) -> Trainee:
    """A small GPT with AdamW after one real step, so the optimizer has state to save."""
    torch.manual_seed(seed)
    model = GPT(**{**MODEL, **model_overrides})
    trainee = Trainee(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), torch.amp.GradScaler("cpu", enabled=False)
    )
    train_once(trainee)
    return trainee


def train_once(trainee: Trainee) -> None:
    vocab = trainee.model.tok_emb.num_embeddings
    tokens = torch.randint(0, vocab, (2, trainee.model.seq_len + 1))
    logits = trainee.model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainee.optimizer.step()


def snapshot(trainee: Trainee) -> dict[str, torch.Tensor]:
    """Copies of every parameter, buffer and optimizer state tensor, keyed by parameter name."""
    out = {f"model/{k}": v.detach().clone() for k, v in trainee.model.state_dict().items()}
    for name, param in trainee.model.named_parameters():
        for key, value in trainee.optimizer.state[param].items():
            out[f"optim/{name}/{key}"] = value.detach().clone()
    return out


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        got = actual[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.contiguous().numpy().tobytes() == want.contiguous().numpy().tobytes(), key


def save_at(manager: CheckpointManager, trainee: Trainee, step: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """Commit a checkpoint of ``trainee`` at ``step``; returns its directory and what it holds."""
    progress = TrainingProgress(step=step, samples_seen=2 * step, world_size=1, seed=0)
    path = manager.save(
        portable.capture(trainee.model, trainee.optimizer, trainee.scaler),
        ADAPTER.get_rng_state(DEVICE),
        ADAPTER,
        progress,
        config={},
    )
    assert isinstance(path, Path), path  # a local root, never an object-store URL
    return path, snapshot(trainee)


def restore_into(root: Path, into: Trainee | None = None) -> tuple[Restored | None, Trainee]:
    """Restore ``root`` into a freshly built model (different weights from any saved one)."""
    trainee = into or make_trainee(seed=1234)
    restored = CheckpointManager(root).restore(
        trainee.model, trainee.optimizer, trainee.scaler, ADAPTER, DEVICE
    )
    return restored, trainee


def file_tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256 | "<dir>"}`` of everything under ``root``, hidden files included."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def reseal(directory: Path) -> None:
    """Recompute the manifest's file checksums, as an attacker who edits a checkpoint would."""
    manifest = Manifest.read(directory)
    manifest.files = checksum_files(directory)
    manifest.write(directory)


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
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


def make_pair(root: Path) -> Pair:
    manager = CheckpointManager(root)
    trainee = make_trainee()
    older, older_state = save_at(manager, trainee, OLDER)
    train_once(trainee)
    newer, newer_state = save_at(manager, trainee, NEWER)
    return Pair(root, older, older_state, newer, newer_state)


def copy_pair(template: Pair, workdir: Path) -> Pair:
    root = workdir / "ckpt"
    shutil.copytree(template.root, root)
    return Pair(
        root,
        root / template.older.name,
        template.older_state,
        root / template.newer.name,
        template.newer_state,
    )


def assert_fell_back(pair: Pair, restored: Restored | None, trainee: Trainee) -> str:
    """The older checkpoint was restored bitwise and the newer one skipped; returns the skip reason."""
    assert restored is not None
    assert restored.path == pair.older
    assert restored.manifest.step == OLDER
    assert [p for p, _ in restored.skipped] == [pair.newer]
    assert_bitwise_equal(snapshot(trainee), pair.older_state)
    return restored.skipped[0][1]
