"""The live progress line on the driver: step/total, loss, samples/s, family, restarts, ETA.

On a terminal the line is redrawn in place; elsewhere (CI logs, files) it prints a plain line every
``log_interval`` steps instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, log_interval: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.log_interval = log_interval
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.started = time.monotonic()
        self.first_step: int | None = None

    def update(self, step: int, loss: float, samples_per_s: float, family: str, restarts: int) -> None:
        if self.first_step is None:
            self.first_step, self.started = step - 1, time.monotonic()
        done = step - self.first_step
        rate = done / (time.monotonic() - self.started) if done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        text = (
            f"step {step}/{self.total}  loss {loss:.4f}  {samples_per_s:.0f} samples/s  {family}"
            f"  restarts {restarts}  ETA {_duration(eta)}"
        )
        if self.live:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        elif step % self.log_interval == 0 or step == self.total:
            print(text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line of its own (an event), without garbling the live line."""
        if self.live:
            self.stream.write("\r\x1b[2K")
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
