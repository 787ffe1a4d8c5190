"""Build nanoGPT-layout token files from text files on disk.

    python -m examples.lm_tokens.prepare --out DIR [--source DIR] [--limit N] [--val-every N]

Writes ``DIR/train.bin`` and ``DIR/val.bin`` (flat ``uint16`` arrays, the layout nanoGPT's ``prepare.py``
writes and its ``train.py`` memory-maps) and ``DIR/meta.json`` (the vocabulary size and what went where).
The tokenizer is byte-level: a token is one byte of the file (vocabulary 256); each file ends with a NUL
token, which source text never contains, as an end-of-document mark.

The default source is the Python standard library's own ``*.py`` files: real text on every machine, no
download. The split is by file and deterministic: the files are sorted by their path relative to the source,
the first ``--limit`` kept, and every ``--val-every``-th of them goes to ``val.bin``.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
END_OF_DOCUMENT = 0
#: Third-party packages installed under some standard libraries' directory: not the standard library.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def default_source() -> Path:
    """This interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(source: Path, limit: int | None = None) -> list[Path]:
    """The ``*.py`` files under ``source`` in sorted order of their relative path (the first ``limit``)."""
    files = sorted(
        (
            p
            for p in source.rglob("*.py")
            if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(source).parts)
        ),
        key=lambda p: p.relative_to(source).as_posix(),
    )
    return files[:limit] if limit is not None else files


def split(files: list[Path], val_every: int) -> tuple[list[Path], list[Path]]:
    """``(train, val)``: every ``val_every``-th file is held out (the last file when there are fewer)."""
    if len(files) < 2:
        raise ValueError(f"need at least 2 text files to split into train and val, found {len(files)}")
    val = files[val_every - 1 :: val_every] or files[-1:]
    held = set(val)
    return [f for f in files if f not in held], val


def tokens(files: list[Path]) -> np.ndarray:
    """The byte-level tokens of ``files``, concatenated, each file followed by the end-of-document token."""
    parts: list[np.ndarray] = []
    for path in files:
        parts.append(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([END_OF_DOCUMENT], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def prepare(out: Path, source: Path, limit: int | None = None, val_every: int = 10) -> dict[str, int]:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` under ``out``; returns ``meta.json``'s content."""
    train_files, val_files = split(text_files(source, limit), val_every)
    out.mkdir(parents=True, exist_ok=True)
    train, val = tokens(train_files), tokens(val_files)
    train.tofile(out / "train.bin")
    val.tofile(out / "val.bin")
    meta = {
        "vocab_size": VOCAB_SIZE,
        "train_files": len(train_files),
        "val_files": len(val_files),
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train.bin, val.bin, meta.json")
    parser.add_argument(
        "--source", type=Path, default=None, help="directory of *.py text files (default: the stdlib)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N files (sorted)")
    parser.add_argument("--val-every", type=int, default=10, help="hold out every N-th file (default 10)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit={args.limit}: need at least 2 files (one for train, one for val)")
    if args.val_every < 2:
        parser.error(f"--val-every={args.val_every}: must be >= 2, or nothing is left to train on")
    source = args.source if args.source is not None else default_source()
    if not source.is_dir():
        parser.error(f"--source={source}: not a directory")
    meta = prepare(args.out, source, args.limit, args.val_every)
    print(f"{source} -> {args.out}: " + ", ".join(f"{k}={v}" for k, v in meta.items()))


if __name__ == "__main__":
    main()
