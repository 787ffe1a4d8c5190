"""RNG state per rank: saved under the family's key, restored on the same family, re-derived elsewhere.

Generators of different families are different algorithms (CUDA's Philox, the CPU's Mersenne Twister), so
a state saved on one cannot continue on another. When the family or the world size changes, each rank's
generators are seeded from :func:`derive_seed` ``(seed, step, rank)`` instead — deterministic, distinct
per rank and per resume point — and the change is recorded in the next manifest's history.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointCorruptError


def derive_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rng_file(directory: Path, rank: int) -> Path:
    return directory / "rng" / f"rank_{rank:05d}.json"


def write_rng(directory: Path, rank: int, key: str, states: dict[str, torch.Tensor]) -> None:
    path = rng_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "rng_key": key,
        "states": {
            name: base64.b64encode(t.contiguous().numpy().tobytes()).decode() for name, t in states.items()
        },
    }
    with open(path, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())


def read_rng(directory: Path, rank: int) -> tuple[str, dict[str, torch.Tensor]] | None:
    """``(rng_key, states)`` saved by ``rank``, or None when that rank saved none (other world size)."""
    path = rng_file(directory, rank)
    if not path.exists():
        return None
    try:
        body: dict[str, Any] = json.loads(path.read_text())
        states = {
            name: torch.frombuffer(bytearray(base64.b64decode(data)), dtype=torch.uint8)
            for name, data in body["states"].items()
        }
        return str(body["rng_key"]), states
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorruptError(f"{path}: unreadable RNG state ({exc})") from None
