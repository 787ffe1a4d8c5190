"""Every time limit of a running worker group, from the measured step time with floors, never minutes.

The controller feeds each heartbeat's step times in; the limits follow the median of the recent ones.
Before the first heartbeat only the floors apply.
"""

from __future__ import annotations

import statistics

from trainer.config import ClusterConfig, FaultToleranceConfig

#: Steps whose times the median is taken over.
_RECENT = 50


class Deadlines:
    def __init__(
        self, cluster: ClusterConfig, fault_tolerance: FaultToleranceConfig, compiles: bool = False
    ) -> None:
        self.cluster = cluster
        self.fault_tolerance = fault_tolerance
        #: Whether the ranks compile their model (``train.compile``): then a rank may spend minutes in one
        #: compilation, a replacement's first steps included, while its peers wait in a collective.
        self.compiles = compiles
        self.step_times: list[float] = []

    def record(self, step_times: list[float]) -> None:
        self.step_times.extend(step_times)
        del self.step_times[:-_RECENT]

    def median_step_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None

    def _scaled(self, factor: float, floor: float) -> float:
        median = self.median_step_s()
        return floor if median is None else max(factor * median, floor)

    def hang_after_s(self) -> float:
        """A rank silent outside a collective for this long is hung."""
        ft = self.fault_tolerance
        return self._scaled(ft.hang_factor, ft.hang_floor_s)

    def compile_s(self) -> float:
        """A rank inside one compilation for this long is hung (0: the ranks do not compile)."""
        return self.fault_tolerance.compile_timeout_s if self.compiles else 0.0

    def chunk_steps(self) -> int:
        """A Ray group's chunk: ``cluster.chunk_steps`` steps, or with ``cluster.chunk_s`` as many as fill it at
        the median step time (before the first heartbeat: ``chunk_steps``), never fewer."""
        median = self.median_step_s()
        if self.cluster.chunk_s <= 0 or not median:
            return self.cluster.chunk_steps
        return max(self.cluster.chunk_steps, int(self.cluster.chunk_s / median))

    def chunk_s(self, steps: int) -> float:
        """A chunk of ``steps`` steps still running after this long is late (every pending rank is hung)."""
        return self._scaled(self.cluster.deadline_factor * steps, self.cluster.deadline_floor_s)

    def release_s(self) -> float:
        """How long survivors have to leave a collective whose peer failed before they are killed."""
        return self._scaled(self.cluster.release_factor, self.cluster.release_floor_s)

    def collective_timeout(self) -> float:
        """Collective timeout for the next incarnation: a multiple of the measured step time, and no shorter
        than a compilation may take (a replacement compiles while its peers wait in the first all-reduce)."""
        return max(
            self._scaled(self.cluster.deadline_factor * 10, self.cluster.deadline_floor_s), self.compile_s()
        )
