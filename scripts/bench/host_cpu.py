"""Where a host's CPU time goes while a benchmark runs (Linux ``/proc``): the training ranks' share, every
other process's (by name: Ray's daemons, the driver, the rest of the machine) and idle.

On a host whose ranks use every core, whatever else runs can take its time from them: the others' share is
an upper bound on what a run on Ray pays beside its ranks that a plain loop, with nothing beside it, does
not. (Bound, not measure: while the ranks wait for each other the cores idle, and other work fits there.)

    with CpuSampler(is_rank=lambda cmdline: cmdline.startswith("ray::WorkerActor")) as sampler:
        ...  # the run
    sampler.shares(t0, t1)  # {"ranks": 0.91, "others": 0.03, "idle": 0.06, "others_by_name": {...}}

The sampler runs on a thread of the calling process, reading every process's ``stat`` each ``every_s``
(~1 ms of CPU a sample for ~150 processes): its own cost is in the calling process's share.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    time: float  # time.time(), as the journal's
    busy_s: float  # every cpu's non-idle seconds since boot (/proc/stat)
    idle_s: float
    #: Each process's user + system seconds, by pid, with its name (a rank's is "rank").
    processes: dict[int, tuple[str, float]]


def _host() -> tuple[float, float]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / _TICK, idle / _TICK


def _processes(is_rank: Callable[[str], bool]) -> dict[int, tuple[str, float]]:
    found: dict[int, tuple[str, float]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # the process ended while being read
            continue
        after_name = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(after_name[11]) + int(after_name[12])) / _TICK  # utime, stime (fields 14 and 15)
        if seconds or is_rank(cmdline):
            found[int(pid)] = ("rank" if is_rank(cmdline) else _name(cmdline, stat), seconds)
    return found


def _name(cmdline: str, stat: str) -> str:
    """A short name: Ray's process title (``ray::…``, ``raylet``, ``gcs_server``), else the program with
    its module or script."""
    words = cmdline.split()
    if not words:
        return stat[stat.index("(") + 1 : stat.rindex(")")]  # a kernel thread
    program = os.path.basename(words[0])
    if program.startswith("python") and len(words) > 1:
        rest = words[2] if words[1] == "-m" and len(words) > 2 else os.path.basename(words[1])
        return f"{program} {rest}"[:60]
    return program[:60]


class CpuSampler:
    """Samples the host's cpu-seconds and every process's each ``every_s`` on a thread, while in use as a
    context manager."""

    def __init__(self, is_rank: Callable[[str], bool], every_s: float = 0.25) -> None:
        self.is_rank, self.every_s = is_rank, every_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        busy, idle = _host()
        self.samples.append(Sample(time.time(), busy, idle, _processes(self.is_rank)))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def shares(self, start: float, end: float, top: int = 6) -> dict[str, object]:
        """Fractions of the cpu-seconds between the first sample at or after ``start`` and the last at or
        before ``end`` (epoch seconds; the ranks may be gone right after it): the ranks', every other
        process's (and the ``top`` names among them), and idle."""
        times = [s.time for s in self.samples]
        a = self.samples[min(bisect_left(times, start), len(times) - 1)]
        b = self.samples[max(bisect_right(times, end) - 1, 0)]
        busy, idle = b.busy_s - a.busy_s, b.idle_s - a.idle_s
        total = busy + idle
        if total <= 0:
            raise ValueError(f"no cpu time sampled between {start} and {end}")
        # Per process: one that ended in the window (an earlier run's rank) must not count against the rest;
        # one that began in it counts from zero.
        by_name: dict[str, float] = defaultdict(float)
        for pid, (name, seconds) in b.processes.items():
            before = a.processes.get(pid)
            by_name[name] += seconds - (before[1] if before is not None else 0.0)
        ranks = by_name.pop("rank", 0.0)
        return {
            "ranks": ranks / total,
            "others": (busy - ranks) / total,
            "idle": idle / total,
            "others_by_name": {
                n: round(s / total, 4) for n, s in sorted(by_name.items(), key=lambda i: -i[1])[:top] if s > 0
            },
        }
