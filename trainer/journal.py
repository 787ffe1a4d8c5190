"""Append-only JSONL record of everything that happened to a run: events, figures, decisions.

One line per event, flushed as written, so a killed driver loses at most the line being written and a
re-launched one appends to the same file. Readers skip a torn last line.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # background checkpoint writers record too

    def record(self, event: str, *, durable: bool = True, **fields: Any) -> dict[str, Any]:
        """Append ``event`` with ``fields`` (JSON-serialisable; others are written as strings).

        ``durable=False`` skips the fsync: for frequent, reconstructible entries (heartbeats), whose loss in
        a machine crash costs nothing but detail.
        """
        entry = {"time": time.time(), "event": event, **fields}
        line = json.dumps(entry, default=str, sort_keys=False)
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            if durable:
                os.fsync(f.fileno())
        return entry

    def read(self) -> list[dict[str, Any]]:
        """Every complete entry, oldest first."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
        return entries
