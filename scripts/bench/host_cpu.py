"""Where a host's CPU time goes while a benchmark runs (Linux ``/proc``): the training ranks' share and
everyone else's — Ray's daemons, the driver, the rest of the machine.

On a host whose ranks use every core, whatever else runs takes its time from them: the share of the other
processes is a floor under the ratio of a run on Ray to a plain loop that has no daemons beside it.

    sampler = CpuSampler(is_rank=lambda cmdline: cmdline.startswith("ray::WorkerActor"))
    with sampler:
        ...  # the run
    sampler.shares(t0, t1)  # {"ranks": 0.93, "others": 0.05, "idle": 0.02} of the window's cpu-seconds
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left, bisect_right
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
    ranks_s: dict[int, float]  # each rank process's user + system seconds, by pid


def _host() -> tuple[float, float]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / _TICK, idle / _TICK


def _ranks_s(is_rank: Callable[[str], bool]) -> dict[int, float]:
    seconds: dict[int, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not is_rank(cmdline):
                continue
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # the process ended while being read
            continue
        after_name = stat[stat.rindex(")") + 2 :].split()
        seconds[int(pid)] = (int(after_name[11]) + int(after_name[12])) / _TICK  # utime, stime (14, 15)
    return seconds


class CpuSampler:
    """Samples the host's cpu-seconds and the ranks' every ``every_s`` on a thread, while in use as a
    context manager."""

    def __init__(self, is_rank: Callable[[str], bool], every_s: float = 0.2) -> None:
        self.is_rank, self.every_s = is_rank, every_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        busy, idle = _host()
        self.samples.append(Sample(time.time(), busy, idle, _ranks_s(self.is_rank)))

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

    def shares(self, start: float, end: float) -> dict[str, float]:
        """Fractions of the cpu-seconds between the first sample at or after ``start`` and the last at or
        before ``end`` (epoch seconds; the ranks may be gone right after it): the ranks', every other
        process's, and idle."""
        times = [s.time for s in self.samples]
        a = self.samples[min(bisect_left(times, start), len(times) - 1)]
        b = self.samples[max(bisect_right(times, end) - 1, 0)]
        busy, idle = b.busy_s - a.busy_s, b.idle_s - a.idle_s
        # Per process: one that ended in the window (an earlier run's rank) must not count against the rest;
        # one that began in it counts from zero.
        ranks = sum(t - a.ranks_s.get(pid, 0.0) for pid, t in b.ranks_s.items())
        total = busy + idle
        if total <= 0:
            raise ValueError(f"no cpu time sampled between {start} and {end}")
        return {"ranks": ranks / total, "others": (busy - ranks) / total, "idle": idle / total}
