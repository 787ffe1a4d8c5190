"""Health probes: interconnect and device checks that run under deadlines and return result objects.

Every probe here returns a plain, picklable dataclass — never raises for a failed or hung device or link,
never blocks much past its deadline — so that a controller can act on the result (``assess`` it against a
baseline, compare ranks' timings) and ship it across Ray actors or into a JSON journal (``to_dict``).

- :func:`run_with_deadline`: any call in a daemon thread joined with a timeout.
- :func:`probe_interconnect`: all-reduce bandwidth per size and ring links over the default process group.
- :func:`assess`: healthy / degraded against a baseline bus bandwidth and the other links (pure).
- :func:`probe_device`: matmul correctness to the bit against a float64 reference, allocation, matmul time.
- :func:`compare_results`, :func:`wrong_ranks`: the probe's result bits compared across ranks (pure).
- :func:`compare_timings`: ranks slower than a factor of the median (pure).
"""

from __future__ import annotations

from trainer.health.assessment import Assessment, assess
from trainer.health.deadline import DeadlineResult, run_with_deadline
from trainer.health.device import (
    BitwiseVerdict,
    DeviceReport,
    compare_results,
    compare_timings,
    probe_device,
    wrong_ranks,
)
from trainer.health.interconnect import ProbeCollectiveError, probe_interconnect
from trainer.health.interconnect_report import (
    BandwidthPoint,
    InterconnectReport,
    LinkReport,
    bandwidth_point,
)

__all__ = [
    "Assessment",
    "BandwidthPoint",
    "BitwiseVerdict",
    "DeadlineResult",
    "DeviceReport",
    "InterconnectReport",
    "LinkReport",
    "ProbeCollectiveError",
    "assess",
    "bandwidth_point",
    "compare_results",
    "compare_timings",
    "probe_device",
    "probe_interconnect",
    "run_with_deadline",
    "wrong_ranks",
]
