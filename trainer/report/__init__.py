"""A run's report, from its journal: the story as data (:mod:`~trainer.report.story`), as text
(:mod:`~trainer.report.text`), its loss curve as a PNG (:mod:`~trainer.report.plot`), and the command
``python -m trainer.report RUN_DIR`` that gives all three (:mod:`~trainer.report.cli`)."""

from __future__ import annotations

from trainer.report.cli import main
from trainer.report.plot import family_colours, plot
from trainer.report.story import JournalMissingError, build_report, load_events
from trainer.report.text import format_report

__all__ = [
    "JournalMissingError",
    "build_report",
    "family_colours",
    "format_report",
    "load_events",
    "main",
    "plot",
]
