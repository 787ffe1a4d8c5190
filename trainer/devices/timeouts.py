"""The collective backend's own timeouts and error handling, derived from the run's collective timeout.

The controller derives one collective timeout T from the measured step time (``Deadlines``). Passing T to
``init_process_group`` is enough for gloo; NCCL and HCCL also keep watchdogs and timeouts of their own,
set through the environment of the process before its group is created, whose defaults (HCCL: 1836 s)
would let a hang inside the backend outlast every deadline of the toolkit. Each adapter's
``backend_timeouts(T)`` returns one :class:`BackendTimeouts`; :func:`apply` puts it into the environment and
:func:`join_group` does that and creates the process group with it.

The NCCL and HCCL values are implemented from their documentation and the torch / torch_npu sources, and
untested on hardware: the tests here check the values and the environment a process sees, not the backends'
reaction to them.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

#: Atlas training hardware counts HCCL_EXEC_TIMEOUT in whole multiples of 68 s (CANN environment variable
#: reference); the documented range is 0-17340 s (0: never), default 1836 s.
HCCL_GRANULE_S = 68
HCCL_EXEC_MAX_S = 17340
#: HCCL_CONNECT_TIMEOUT: documented range 120-7200 s, default 120 s.
HCCL_CONNECT_RANGE_S = (120, 7200)
#: ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` / ``TORCH_HCCL_ASYNC_ERROR_HANDLING``: 0 none, 1 TearDown (abort the
#: communicator and kill the process), 2 CleanUpOnly (abort the communicator, keep the process), 3 SkipCleanUp
#: (kill the process at once; torch's default). Survivors must live to be released and reused: 2.
CLEAN_UP_ONLY = "2"


@dataclass(frozen=True)
class BackendTimeouts:
    """What one family's collective backend is told for a collective timeout ``requested_s``. Picklable."""

    backend: str
    requested_s: float
    #: The ``timeout`` given to ``init_process_group``; ``>= requested_s``.
    process_group_s: float
    #: Variables set in the worker's environment before its process group is created.
    environment: dict[str, str] = field(default_factory=dict)
    #: How the values were derived and which rule of the backend they respect (for the journal).
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "requested_s": self.requested_s,
            "process_group_s": self.process_group_s,
            "environment": dict(self.environment),
            "rule": self.rule,
        }


def _check(timeout_s: float) -> None:
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"collective timeout_s={timeout_s!r}: allowed: a finite number of seconds > 0")


def gloo(timeout_s: float) -> BackendTimeouts:
    """gloo has no watchdog of its own: the process group's timeout is the whole story."""
    _check(timeout_s)
    return BackendTimeouts("gloo", timeout_s, timeout_s, {}, "gloo: process-group timeout = T")


def nccl(timeout_s: float) -> BackendTimeouts:
    """NCCL: the watchdog times collectives out at the process group's timeout T; on an error it aborts the
    communicator only (CleanUpOnly), and its heartbeat monitor — which kills a process whose watchdog itself
    is stuck, 480 s by default — waits 2T."""
    _check(timeout_s)
    heartbeat = max(1, math.ceil(2 * timeout_s))
    environment = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": CLEAN_UP_ONLY,
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(heartbeat),
    }
    rule = "nccl: process-group timeout = T; heartbeat monitor 2T; errors abort the communicator only"
    return BackendTimeouts("nccl", timeout_s, timeout_s, environment, rule)


def hccl(timeout_s: float) -> BackendTimeouts:
    """HCCL: ``HCCL_EXEC_TIMEOUT`` is the smallest multiple of 68 s at or above T (so HCCL never gives up
    before the toolkit would), capped at 17340 s; the process group's timeout is one granule more, because
    torch_npu's watchdog must outlast HCCL's own timeout (Ascend's guidance; torch_npu warns otherwise and
    loses HCCL's log). ``HCCL_CONNECT_TIMEOUT`` is T within its documented 120-7200 s. Errors abort the
    communicator only (``TORCH_HCCL_ASYNC_ERROR_HANDLING=2``; the older ``HCCL_ASYNC_ERROR_HANDLING`` is
    deprecated in torch_npu 2.13)."""
    _check(timeout_s)
    granules = max(1, math.ceil(timeout_s / HCCL_GRANULE_S))
    execute = min(granules * HCCL_GRANULE_S, HCCL_EXEC_MAX_S)
    process_group = max(float(timeout_s), float(execute + HCCL_GRANULE_S))
    low, high = HCCL_CONNECT_RANGE_S
    connect = min(max(math.ceil(timeout_s), low), high)
    environment = {
        "HCCL_EXEC_TIMEOUT": str(execute),
        "HCCL_CONNECT_TIMEOUT": str(connect),
        "TORCH_HCCL_ASYNC_ERROR_HANDLING": CLEAN_UP_ONLY,
    }
    rule = (
        f"hccl: HCCL_EXEC_TIMEOUT = ceil(T / {HCCL_GRANULE_S}) x {HCCL_GRANULE_S} s; process-group timeout "
        f"= HCCL_EXEC_TIMEOUT + {HCCL_GRANULE_S} s (above it); HCCL_CONNECT_TIMEOUT = T within {low}-{high} s"
    )
    return BackendTimeouts("hccl", timeout_s, process_group, environment, rule)


def apply(timeouts: BackendTimeouts, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``timeouts.environment`` in ``environ`` (the process's own by default), overriding what was
    there; returns what was set. Call it before the process group is created: the backends read these once.
    """
    target = os.environ if environ is None else environ
    target.update(timeouts.environment)
    return dict(timeouts.environment)
