"""Device probe: does the device compute right, to the bit, allocate memory, and how fast is it (a matmul)?

Silent data corruption is looked for in two ways, on one matmul of deterministic inputs:

(a) **against a float64 reference**, under a bound derived from the arithmetic (:func:`exact_input_range`):
    the inputs are chosen so that every product and every partial sum is representable in the dtype, which
    makes the device's result *exact* — zero error, whatever the summation order, blocking, split-K, FMA use
    or rounding mode. The bound is therefore 0 and any changed bit of a non-zero result is caught (a tolerance
    that arbitrary inputs would need, ``k·u·(|A||B|)``, lets the lowest ~12 fp32 mantissa bits through);
(b) **bitwise across ranks** (:func:`compare_results`): same inputs, same kernel, same bits on healthy devices;
    the report carries a digest of the result's bytes and ranks outside the majority are named.

Local to one process: no collectives, so ranks run it independently and the caller compares their reports
(:func:`compare_results`, :func:`compare_timings`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trainer.devices.base import DeviceAdapter
from trainer.devices.vendor import VendorReport
from trainer.faults import BitFlip, corrupt_matmul
from trainer.health.deadline import run_with_deadline

#: Bits of each dtype's significand, the implicit leading one included. Matmul units accumulate fp16 and bf16
#: in fp32, or — with reduced-precision reductions — in the dtype itself; the dtype's width is the narrower.
SIGNIFICAND_BITS: dict[torch.dtype, int] = {
    torch.float64: 53,
    torch.float32: 24,
    torch.float16: 11,
    torch.bfloat16: 8,
}
#: Inputs are integers of at most 8 bits: exact in every format a matmul unit may round fp32 inputs to
#: (TF32 on CUDA and HF32 on Ascend keep 11 significand bits, bf16 8).
MAX_INPUT = 255
#: Rows of A and columns of B are scaled by 2**e, e in [-SCALE_EXP, SCALE_EXP], so that results span a few
#: binades (the exponent path is exercised too) while staying exact and inside fp16's range.
SCALE_EXP = 2
_ALLOC_BYTES = 8 << 20
_SEED = 1234


def exact_input_range(size: int, dtype: torch.dtype) -> int:
    """The largest ``m`` such that a ``size``-deep matmul of integers in ``[-m, m]`` is exact in ``dtype``.

    Derivation. Let p be the significand bits of ``dtype`` (:data:`SIGNIFICAND_BITS`); every integer of
    magnitude at most 2**p is representable with p bits. With |a|, |b| <= m, each product is an integer of
    magnitude <= m**2, and every partial sum of C[i, j] — in any order, any blocking, with or without FMA — is
    an integer of magnitude <= sum_l |a_il||b_lj| <= size * m**2. If size * m**2 <= 2**p, every product,
    every intermediate and the result are exact; the power-of-two row and column scales (:data:`SCALE_EXP`)
    multiply all of them by one factor per element and keep them exact (no overflow: the largest result,
    2**11 * 2**(2 * SCALE_EXP) in fp16, stays below 65504). Hence |C - C_ref| = 0, element by element: the
    bound of check (a) is 0 for every dtype and size this function accepts.

    Raises ``ValueError`` naming the size and dtype when no ``m >= 1`` exists (bf16 deeper than 256).
    """
    if dtype not in SIGNIFICAND_BITS:
        allowed = ", ".join(str(d) for d in SIGNIFICAND_BITS)
        raise ValueError(f"device probe: dtype={dtype}; allowed: {allowed}")
    if size < 1:
        raise ValueError(f"device probe: size={size}; allowed: an integer >= 1")
    m = min(MAX_INPUT, math.isqrt((1 << SIGNIFICAND_BITS[dtype]) // size))
    if m < 1:
        most = 1 << SIGNIFICAND_BITS[dtype]
        raise ValueError(
            f"device probe: size={size} is too deep for an exact {dtype} result; allowed: <= {most}"
        )
    return m


@functools.lru_cache(maxsize=8)
def probe_inputs(size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deterministic inputs ``(a, b)`` in ``dtype`` and their float64 product, on the CPU (cached)."""
    m = exact_input_range(size, dtype)
    generator = torch.Generator().manual_seed(_SEED)
    a = torch.randint(-m, m + 1, (size, size), generator=generator, dtype=torch.float64)
    b = torch.randint(-m, m + 1, (size, size), generator=generator, dtype=torch.float64)
    rows = torch.randint(-SCALE_EXP, SCALE_EXP + 1, (size, 1), generator=generator, dtype=torch.float64)
    cols = torch.randint(-SCALE_EXP, SCALE_EXP + 1, (1, size), generator=generator, dtype=torch.float64)
    a, b = a * torch.exp2(rows), b * torch.exp2(cols)
    reference = a @ b
    if not torch.equal(a.to(dtype).double(), a) or not torch.equal(b.to(dtype).double(), b):
        raise AssertionError(f"device probe inputs are not exact in {dtype}")  # the derivation above is wrong
    return a.to(dtype), b.to(dtype), reference


def result_digest(result: torch.Tensor) -> str:
    """A digest of the tensor's bytes as stored (bit patterns, not values: -0.0 differs from 0.0)."""
    raw = result.detach().cpu().contiguous().view(-1).view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class DeviceReport:
    """What :func:`probe_device` found on one device. Picklable; :meth:`to_dict` for JSON."""

    ok: bool
    #: The matmul disagreed with the reference beyond ``tolerance`` (the device computes wrong): check (a).
    wrong_result: bool
    max_abs_error: float | None
    #: The bound of check (a): 0 for the exact inputs the probe uses (see :func:`exact_input_range`).
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
    #: Digest of the result's bytes, for the bitwise comparison across ranks (check (b)).
    result_digest: str | None = None
    #: Elements of the result that differ from the reference.
    wrong_elements: int = 0
    #: Seconds of the bit-level checks: copy to the host, comparison with the reference, digest.
    check_s: float | None = None
    #: What the family's own health tools said about this device (``adapter.vendor_health``).
    vendor: VendorReport | None = None
    #: A vendor tool reported a fatal condition (uncorrectable ECC, fatal XID, link down, NPU alarm).
    device_unhealthy: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_device(
    adapter: DeviceAdapter,
    device: torch.device,
    size: int = 256,
    faults_wrong_compute: bool = False,
    timeout_s: float = 10.0,
    dtype: torch.dtype = torch.float32,
    bit_flip: BitFlip | None = None,
    vendor_tools_dir: str | None = None,
) -> DeviceReport:
    """Matmul check, memory allocation and matmul time on ``device``, under a ``timeout_s`` deadline.

    Never raises for a failing or hung device: a failure gives ``ok=False`` with ``error``, a hang
    ``timed_out=True``; a ``size`` or ``dtype`` the exact check cannot take raises ``ValueError`` at once.
    Injected faults act on the device's result before it is checked and digested: ``faults_wrong_compute``
    passes it through :func:`trainer.faults.corrupt_matmul` (gross corruption), ``bit_flip`` flips one bit.
    The family's own health tools are read too (``adapter.vendor_health``, from ``vendor_tools_dir`` first);
    a fatal finding makes the report ``device_unhealthy``.
    """
    exact_input_range(size, dtype)
    start = time.monotonic()
    outcome = run_with_deadline(
        _measure,
        timeout_s,
        adapter,
        device,
        size,
        faults_wrong_compute,
        dtype,
        bit_flip,
        timeout_s / 2,
        vendor_tools_dir,
    )
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
    adapter: DeviceAdapter,
    device: torch.device,
    size: int,
    wrong: bool,
    dtype: torch.dtype,
    bit_flip: BitFlip | None,
    tools_timeout_s: float,
    tools_dir: str | None,
) -> dict[str, Any]:
    a, b, reference = probe_inputs(size, dtype)
    a_dev, b_dev = a.to(device), b.to(device)
    torch.matmul(a_dev, b_dev)  # warm-up: kernel selection and lazy initialisation are not timed
    adapter.synchronize(device)
    t0 = time.perf_counter()
    result = torch.matmul(a_dev, b_dev)
    adapter.synchronize(device)
    matmul_s = time.perf_counter() - t0
    if wrong:
        result = corrupt_matmul(result)
    if bit_flip is not None:
        result = bit_flip.apply(result)
    t_check = time.perf_counter()
    host = result.cpu()
    difference = (host.double() - reference).abs()
    difference = torch.where(torch.isnan(difference), math.inf, difference)  # NaN counts as wrong
    tolerance = 0.0
    error = difference.max().item()
    wrong_elements = int((difference > tolerance).sum().item())
    digest = result_digest(host)
    check_s = time.perf_counter() - t_check
    memory = _allocate(adapter, device)
    vendor = adapter.vendor_health(device, tools_timeout_s, tools_dir)
    wrong_result = error > tolerance
    return {
        "ok": not wrong_result and not vendor.fatal,
        "vendor": vendor,
        "device_unhealthy": bool(vendor.fatal),
        "wrong_result": wrong_result,
        "max_abs_error": error,
        "tolerance": tolerance,
        "matmul_s": matmul_s,
        "memory": memory,
        "device": str(device),
        "dtype": str(dtype),
        "result_digest": digest,
        "wrong_elements": wrong_elements,
        "check_s": check_s,
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


@dataclass(frozen=True)
class BitwiseVerdict:
    """Check (b) over the ranks of one family: whose result bits disagree. Picklable."""

    #: Ranks named wrong: outside a strict majority, or — without one — failing check (a) as well.
    disagreeing: tuple[int, ...]
    #: Without a majority, ranks that pass check (a) yet still differ among themselves: nobody can say who
    #: is wrong (with exact inputs, only a zero's sign or a NaN's payload can differ so).
    undecided: tuple[int, ...]
    #: Distinct digests seen, each with the ranks that produced it.
    groups: dict[str, tuple[int, ...]]

    @property
    def agreed(self) -> bool:
        return len(self.groups) <= 1


def compare_results(reports: Mapping[int, DeviceReport]) -> BitwiseVerdict:
    """Compare the result bits of ranks that ran the same probe on one family (check (b)). Pure.

    Ranks whose probe produced no result (an error, a timeout) take no part. When a strict majority of the
    others share one digest, the rest are named. Without a majority — two ranks that disagree, a tie — the
    ranks involved are sent to check (a): those it found wrong are named; if the others still differ among
    themselves they are ``undecided``.
    """
    groups: dict[str, list[int]] = {}
    for rank in sorted(reports):
        digest = reports[rank].result_digest
        if digest is not None:
            groups.setdefault(digest, []).append(rank)
    frozen = {digest: tuple(ranks) for digest, ranks in groups.items()}
    if len(groups) <= 1:
        return BitwiseVerdict(disagreeing=(), undecided=(), groups=frozen)
    voters = sum(len(ranks) for ranks in groups.values())
    largest = max(groups.values(), key=len)
    if 2 * len(largest) > voters:
        outside = sorted(r for ranks in groups.values() if ranks is not largest for r in ranks)
        return BitwiseVerdict(disagreeing=tuple(outside), undecided=(), groups=frozen)
    involved = sorted(r for ranks in groups.values() for r in ranks)
    wrong = tuple(r for r in involved if reports[r].wrong_result)
    rest = [r for r in involved if not reports[r].wrong_result]
    # Ranks that pass (a) and still differ among themselves: the disagreement is not explained.
    explained = len({reports[r].result_digest for r in rest}) <= 1
    return BitwiseVerdict(disagreeing=wrong, undecided=() if explained else tuple(rest), groups=frozen)


def wrong_ranks(reports: Mapping[int, DeviceReport]) -> tuple[int, ...]:
    """Ranks whose device computes wrong by check (a) or check (b), sorted. Pure."""
    by_reference = {rank for rank, report in reports.items() if report.wrong_result}
    return tuple(sorted(by_reference | set(compare_results(reports).disagreeing)))
