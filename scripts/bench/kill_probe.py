"""The kill-time probe of ``recovery.py``: a ``sitecustomize`` put on the ``PYTHONPATH`` of the Ray processes
the benchmark starts wraps ``os.kill``, so that a process SIGKILLing itself first appends ``time.time()`` and
its pid to a log (Linux). The same probe times the kill for every system compared, inside the victim."""

from __future__ import annotations

import os
from pathlib import Path

KILL_LOG_ENV = "RECOVERY_BENCH_KILL_LOG"
PROBE = f"""\
# Written by scripts/bench/recovery.py: log the time a process SIGKILLs itself, just before it does.
import os as _os
import time as _time

_LOG = _os.environ.get("{KILL_LOG_ENV}")
if _LOG:
    _real_kill = _os.kill

    def _logged_kill(pid, sig, _real_kill=_real_kill, _log=_LOG):
        if sig == 9 and pid == _os.getpid():
            with open(_log, "a") as f:
                f.write(repr(_time.time()) + " " + str(pid) + "\\n")
        _real_kill(pid, sig)

    _os.kill = _logged_kill
"""


def install_probe(base: Path) -> Path:
    """Put the probe on the PYTHONPATH that Ray's processes will inherit; returns the kill log's path."""
    probe_dir = base / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    log = base / "kills.log"
    os.environ[KILL_LOG_ENV] = str(log)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(probe_dir), os.environ.get("PYTHONPATH")) if p)
    return log


def take_kills(log: Path) -> list[tuple[float, int]]:
    """The kills logged since the last call, oldest first (the log is emptied)."""
    if not log.exists():
        return []
    moved = log.with_suffix(".read")
    log.rename(moved)  # writers open the log per kill, so later kills start a new file
    kills = sorted(
        (float(t), int(pid)) for t, pid in (line.split() for line in moved.read_text().splitlines())
    )
    moved.unlink()
    return kills


def the_kill(kills: list[tuple[float, int]]) -> float:
    if len(kills) != 1:
        raise RuntimeError(f"expected exactly one logged self-SIGKILL in the run, got {kills}")
    return kills[0][0]
