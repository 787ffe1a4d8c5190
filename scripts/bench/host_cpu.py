"""Where a host's CPU time goes while a benchmark runs (Linux ``/proc``): the training ranks' share, every
other process's (by name: Ray's daemons, the driver, the rest of the machine) and idle.

On a host whose ranks use every core, whatever else runs can take its time from them: the others' share is
an upper bound on what a run on Ray pays beside its ranks that a plain loop, with nothing beside it, does
not. (Bound, not measure: while the ranks wait for each other the cores idle, and other work fits there.)

    with CpuSampler(is_rank=lambda cmdline: cmdline.startswith("ray::WorkerActor")) as sampler:
        ...  # the run
    sampler.shares(t0, t1)  # {"ranks": 0.91, "others": 0.03, "idle": 0.06, "others_by_name": {...}}

The sampler runs on a thread of the calling process, reading every process's ``stat`` each ``every_s``
(a command line once per process): its own CPU time is in the calling process's share, and reported.
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
    #: The sampling thread's own CPU seconds so far (inside the calling process's figure).
    own_s: float


def _host() -> tuple[float, float]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / _TICK, idle / _TICK


def _processes(
    is_rank: Callable[[str], bool], names: dict[int, tuple[str, str, float]]
) -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds. ``names`` caches each pid's name, command line and CPU seconds:
    the command line is read again whenever a process other than a rank has run since (a new process
    changes it at ``exec``, a Ray worker at taking an actor), not for the many that sleep."""
    found: dict[int, tuple[str, float]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            after_name = stat[stat.rindex(")") + 2 :].split()
            seconds = (int(after_name[11]) + int(after_name[12])) / _TICK  # utime, stime (fields 14, 15)
            cached = names.get(int(pid))
            if cached is None or (cached[0] != "rank" and seconds != cached[2]):
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
                name = "rank" if is_rank(cmdline) else _name(cmdline, stat)
                cached = (name, cmdline, seconds)
            names[int(pid)] = (cached[0], cached[1], seconds)
        except OSError:  # the process ended while being read
            continue
        found[int(pid)] = (cached[0], seconds)
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

    def __init__(self, is_rank: Callable[[str], bool], every_s: float = 0.5) -> None:
        self.is_rank, self.every_s = is_rank, every_s
        self.samples: list[Sample] = []
        self._own_s = 0.0
        self._names: dict[int, tuple[str, str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        busy, idle = _host()
        found = _processes(self.is_rank, self._names)
        own = time.thread_time() if threading.current_thread() is self._thread else self._own_s
        self._own_s = own
        self.samples.append(Sample(time.time(), busy, idle, found, own))

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
            "sampler": (b.own_s - a.own_s) / total,  # this sampler's own reading, inside the caller's share
            "others_by_name": {
                n: round(s / total, 4) for n, s in sorted(by_name.items(), key=lambda i: -i[1])[:top] if s > 0
            },
        }
