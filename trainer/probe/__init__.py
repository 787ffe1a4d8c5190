"""The interconnect and device probes as a standalone command, ``python -m trainer.probe`` (its options and
output: :mod:`~trainer.probe.cli`; the ranks it runs and their summary: :mod:`~trainer.probe.ranks`)."""

from __future__ import annotations

from trainer.probe.cli import main, parse_size, parse_sizes
from trainer.probe.ranks import ProbeOptions, run_spawned, run_torchrun, summarise

__all__ = ["ProbeOptions", "main", "parse_size", "parse_sizes", "run_spawned", "run_torchrun", "summarise"]
