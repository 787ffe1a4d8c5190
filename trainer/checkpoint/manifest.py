"""The JSON manifest committed with every checkpoint: what it holds and how to check that it is intact.

The manifest is the only file read before a checkpoint is trusted. It carries a checksum of itself
(``manifest_sha256``, over the canonical JSON without that key) and a size and an XXH3-128 digest for every
other file in the checkpoint directory, so a flipped byte or a truncated file anywhere is found before a
single tensor is loaded. XXH3 rather than SHA-256 for the data files: it hashes at memory speed (>10 GB/s
against ~0.5 GB/s here), which keeps verification from dominating save and load time; it detects damage,
not tampering — loading is made safe against hostile files separately (see ``safe_dcp``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import xxhash

from trainer.errors import CheckpointCorruptError

MANIFEST_NAME = "manifest.json"
#: 3: the DCP files use DCP's standard nested layout (``model.<fqn>``…, see ``layout``). Older versions this
#: one reads: 2 wrote flat ``model/<fqn>`` keys, 1 also had no ``task_state``.
FORMAT_VERSION = 3
_READS = (1, 2, 3)
_CHUNK = 8 << 20


def file_digest(path: Path) -> str:
    """XXH3-128 of the file's bytes, hex."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_files(
    directory: Path, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """``{relative path: {"xxh3_128", "bytes"}}`` for every regular file under ``directory`` but the manifest.

    ``known`` holds digests taken while files were written (``dcp_writer``); those files are not read
    again, only their size is checked against the bytes written (a mismatch is an ``OSError``)."""
    out: dict[str, dict[str, Any]] = {}
    known = known or {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            rel = path.relative_to(directory).as_posix()
            size = path.stat().st_size
            if rel in known:
                if known[rel]["bytes"] != size:
                    raise OSError(f"{path}: {known[rel]['bytes']} bytes written, {size} on disk")
                out[rel] = {"xxh3_128": known[rel]["xxh3_128"], "bytes": size}
            else:
                out[rel] = {"xxh3_128": file_digest(path), "bytes": size}
    return out


@dataclass
class Manifest:
    step: int
    samples_seen: int
    world_size: int
    family: str
    rng_key: str
    torch_version: str
    adapter: dict[str, Any]
    #: ``{DCP key: {"dtype": "float32", "shape": [..]}}`` for every tensor in the DCP files.
    tensors: dict[str, dict[str, Any]]
    #: Optimizer class and hyper-parameters per group (device-specific flags removed).
    optimizer: dict[str, Any]
    #: GradScaler state (empty when no scaler was in use).
    scaler: dict[str, Any]
    #: The resolved job configuration.
    config: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Family changes and RNG re-derivations this run's state went through, oldest first.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Figures recorded at save time (loss, eval loss) for parity checks and reports.
    metrics: dict[str, float] = field(default_factory=dict)
    #: The LR scheduler's state and the task's extra JSON values: ``{"scheduler": .., "extra": {..}}``.
    task_state: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    #: The generation of the driver's lease it was committed under (trainer.lease); None: no lease.
    lease_generation: int | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        body = {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict: no deep copy to dump
        body["manifest_sha256"] = _self_digest(body)
        return json.dumps(body, indent=2, sort_keys=True)

    def write(self, directory: Path) -> None:
        """Write ``manifest.json`` into ``directory`` and fsync it."""
        path = directory / MANIFEST_NAME
        with open(path, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Parse and self-check ``directory/manifest.json``; raise CheckpointCorruptError naming the file."""
        path = directory / MANIFEST_NAME
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path}: manifest missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointCorruptError(f"{path}: manifest unreadable ({exc})") from None
        if not isinstance(body, dict):
            raise CheckpointCorruptError(f"{path}: manifest is not a JSON object")
        claimed = body.pop("manifest_sha256", None)
        if claimed != _self_digest(body):
            raise CheckpointCorruptError(f"{path}: manifest checksum mismatch (edited or damaged)")
        if body.get("format_version") not in _READS:
            raise CheckpointCorruptError(
                f"{path}: format_version={body.get('format_version')!r}; this version reads {list(_READS)}"
            )
        if body["format_version"] == 1:
            body.setdefault("task_state", {})
        body.setdefault("lease_generation", None)  # written before leases existed
        names = {f.name for f in fields(cls)}
        if set(body) != names:
            raise CheckpointCorruptError(f"{path}: unexpected manifest keys {sorted(set(body) ^ names)}")
        _check_types(body, path)
        return cls(**body)

    def verify_files(self, directory: Path) -> None:
        """Check every listed file's size and digest, and that no unlisted file appeared."""
        present = {
            p.relative_to(directory).as_posix()
            for p in directory.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME
        }
        missing = sorted(set(self.files) - present)
        if missing:
            raise CheckpointCorruptError(f"{directory}: files listed in the manifest are missing: {missing}")
        extra = sorted(present - set(self.files))
        if extra:
            raise CheckpointCorruptError(f"{directory}: files not listed in the manifest: {extra}")
        for rel, expected in self.files.items():
            path = directory / rel
            size = path.stat().st_size
            if size != expected.get("bytes"):
                raise CheckpointCorruptError(
                    f"{path}: {size} bytes, manifest says {expected.get('bytes')} (truncated?)"
                )
            if file_digest(path) != expected.get("xxh3_128"):
                raise CheckpointCorruptError(
                    f"{path}: checksum (XXH3-128) does not match the manifest (damaged)"
                )


def _self_digest(body: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "manifest_sha256"}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


_INT_FIELDS = ("step", "samples_seen", "world_size", "format_version")
_STR_FIELDS = ("family", "rng_key", "torch_version")
_DICT_FIELDS = ("adapter", "tensors", "optimizer", "scaler", "config", "files", "metrics", "task_state")


def _check_types(body: dict[str, Any], path: Path) -> None:
    """Field types of a self-consistent manifest; a wrong one is damage, reported like any other."""

    def bad(what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{path}: manifest field {what}")

    for key in _INT_FIELDS:
        if not isinstance(body[key], int) or isinstance(body[key], bool):
            raise bad(f"{key}={body[key]!r} is not an integer")
    for key in _STR_FIELDS:
        if not isinstance(body[key], str):
            raise bad(f"{key}={body[key]!r} is not a string")
    for key in _DICT_FIELDS:
        if not isinstance(body[key], dict):
            raise bad(f"{key} is a {type(body[key]).__name__}, not an object")
    if not isinstance(body["history"], list) or not all(isinstance(h, dict) for h in body["history"]):
        raise bad("history is not a list of objects")
    if not isinstance(body["created_at"], int | float) or isinstance(body["created_at"], bool):
        raise bad(f"created_at={body['created_at']!r} is not a number")
    for name, entry in body["files"].items():
        if not (
            isinstance(entry, dict)
            and type(entry.get("bytes")) is int
            and isinstance(entry.get("xxh3_128"), str)
        ):
            raise bad(f"files[{name!r}] is not {{bytes: int, xxh3_128: str}}")
    for name, entry in body["tensors"].items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list)
            and all(type(d) is int for d in shape)
            and isinstance(entry.get("dtype"), str)
        ):
            raise bad(f"tensors[{name!r}] is not {{dtype: str, shape: [int]}}")
