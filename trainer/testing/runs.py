"""What a test's run left behind in its run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.journal import Journal


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """The journal entries named ``name``, oldest first."""
    return [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] == name]
