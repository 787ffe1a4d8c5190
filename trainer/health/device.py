"""Device probe: does the device compute right, allocate memory, and how fast is it (a matmul)?

Catches a device that computes wrong — silent data corruption — by comparing a matmul of seeded random
matrices with a float64 reference on the CPU. Local to one process: no collectives, so ranks can run it
independently and compare their timings afterwards with :func:`compare_timings`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trainer.devices.base import DeviceAdapter
from trainer.faults import corrupt_matmul
from trainer.health.deadline import run_with_deadline

#: Per-dtype relative tolerance of one matmul against the float64 reference, scaled by sqrt(k) and the
#: result's magnitude. Loose on purpose (TF32 on CUDA, HF32 on Ascend): the probe looks for corruption,
#: not for the last bits.
_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-3,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}
_ALLOC_BYTES = 8 << 20
_SEED = 1234


@dataclass(frozen=True)
class DeviceReport:
    """What :func:`probe_device` found on one device. Picklable; :meth:`to_dict` for JSON."""

    ok: bool
    #: The matmul disagreed with the reference beyond ``tolerance`` (the device computes wrong).
    wrong_result: bool
    max_abs_error: float | None
    tolerance: float | None
    #: Seconds of one timed matmul (after a warm-up one), device synchronised.
    matmul_s: float | None
    #: ``adapter.memory_stats`` with the probe's allocation live, plus ``probe_bytes``.
    memory: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    timed_out: bool = False
    device: str = ""
    dtype: str = ""
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_device(
    adapter: DeviceAdapter,
    device: torch.device,
    size: int = 256,
    faults_wrong_compute: bool = False,
    timeout_s: float = 10.0,
    dtype: torch.dtype = torch.float32,
) -> DeviceReport:
    """Matmul check, memory allocation and matmul time on ``device``, under a ``timeout_s`` deadline.

    Never raises and never blocks much past ``timeout_s``: a failure gives ``ok=False`` with ``error``, a
    hang ``timed_out=True``. ``faults_wrong_compute`` passes the device's result through
    :func:`trainer.faults.corrupt_matmul` before the comparison, as an injected silent corruption.
    """
    start = time.monotonic()
    outcome = run_with_deadline(_measure, timeout_s, adapter, device, size, faults_wrong_compute, dtype)
    if outcome.value is None:
        error = outcome.error or "device probe returned nothing"
        return DeviceReport(
            ok=False,
            wrong_result=False,
            max_abs_error=None,
            tolerance=None,
            matmul_s=None,
            error=error,
            timed_out=outcome.timed_out,
            device=str(device),
            dtype=str(dtype),
            duration_s=time.monotonic() - start,
        )
    return DeviceReport(**{**outcome.value, "duration_s": time.monotonic() - start})


def _measure(
    adapter: DeviceAdapter, device: torch.device, size: int, wrong: bool, dtype: torch.dtype
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(_SEED)
    a = torch.randn(size, size, generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(size, size, generator=generator, dtype=torch.float64).to(dtype)
    # The reference sees the same (already rounded) inputs as the device.
    reference = a.double() @ b.double()
    a_dev, b_dev = a.to(device), b.to(device)
    torch.matmul(a_dev, b_dev)  # warm-up: kernel selection and lazy initialisation are not timed
    adapter.synchronize(device)
    t0 = time.perf_counter()
    result = torch.matmul(a_dev, b_dev)
    adapter.synchronize(device)
    matmul_s = time.perf_counter() - t0
    if wrong:
        result = corrupt_matmul(result)
    error = (result.double().cpu() - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    tolerance = _RTOL.get(dtype, 5e-2) * math.sqrt(size) * scale
    memory = _allocate(adapter, device)
    wrong_result = not error <= tolerance  # NaN counts as wrong
    return {
        "ok": not wrong_result,
        "wrong_result": wrong_result,
        "max_abs_error": error,
        "tolerance": tolerance,
        "matmul_s": matmul_s,
        "memory": memory,
        "device": str(device),
        "dtype": str(dtype),
    }


def _allocate(adapter: DeviceAdapter, device: torch.device) -> dict[str, int]:
    """Allocate and touch a few MB on the device; memory figures taken while the block is live."""
    block = torch.ones(_ALLOC_BYTES, dtype=torch.uint8, device=device)
    total = int(block.sum().item())
    if total != _ALLOC_BYTES:
        raise RuntimeError(f"device memory check: wrote {_ALLOC_BYTES} ones, read back a sum of {total}")
    stats = dict(adapter.memory_stats(device))
    stats["probe_bytes"] = _ALLOC_BYTES
    del block
    return stats


def compare_timings(times_by_rank: dict[int, float], factor: float = 1.4) -> list[int]:
    """Ranks whose time exceeds ``factor`` x the median time of all ranks, sorted. Pure."""
    if not times_by_rank:
        return []
    median = statistics.median(times_by_rank.values())
    return sorted(rank for rank, seconds in times_by_rank.items() if seconds > factor * median)
