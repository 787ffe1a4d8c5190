"""A run's story, told from its journal, and its loss curve as a PNG.

``python -m trainer.report RUN_DIR [--png PATH] [--json]`` reads ``RUN_DIR/journal.jsonl`` and prints which
device families trained which steps, the failures, the decisions and their reasons, recoveries, hand-overs
with their parity checks, goodput and the final loss (``--json``: the same as one JSON object). It always
writes the loss curve, coloured by family and marked at failures, recoveries and hand-overs, to ``--png``
(default ``RUN_DIR/loss.png``). A missing or empty journal exits with code 2 and names the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.errors import ExitCode
from trainer.report.plot import plot
from trainer.report.story import JournalMissingError, build_report, load_events
from trainer.report.text import format_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds journal.jsonl)")
    parser.add_argument("--png", type=Path, default=None, help="where to write the plot (RUN_DIR/loss.png)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    try:
        events = load_events(args.run_dir)
    except JournalMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)  # a bad argument, like a bad setting
    report = build_report(events, args.run_dir)
    png = plot(report, args.png or args.run_dir / "loss.png")
    if args.json:
        print(json.dumps({**report, "png": str(png)}, indent=2, default=str))
    else:
        print(f"{format_report(report)}\nplot: {png}")
    return int(ExitCode.FINISHED)
