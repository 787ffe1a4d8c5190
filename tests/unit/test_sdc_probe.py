"""The device probe's silent-corruption checks, to the bit, on the real probe and the CPU-backed families.

(a) is the comparison with the float64 reference under the bound derived in
:func:`trainer.health.device.exact_input_range`; (b) the bitwise comparison across ranks
(:func:`trainer.health.device.compare_results`). Bit flips go through the fault seam the probe already has
(:class:`trainer.faults.BitFlip`, applied to the device's result before it is checked), one probe per bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.devices import get_adapter
from trainer.faults import BitFlip
from trainer.health.device import (
    MAX_INPUT,
    SCALE_EXP,
    SIGNIFICAND_BITS,
    DeviceReport,
    compare_results,
    exact_input_range,
    probe_device,
    probe_inputs,
    wrong_ranks,
)

FAMILIES = ("cpu", "sim_npu", "sim_cuda")
#: (dtype, exponent bits, mantissa bits) of the IEEE-style formats the probe runs in.
FORMATS = [(torch.float32, 8, 23), (torch.float16, 5, 10), (torch.bfloat16, 8, 7)]


def _probe(
    family: str = "cpu", dtype: torch.dtype = torch.float32, flip: BitFlip | None = None
) -> DeviceReport:
    adapter = get_adapter(family)
    return probe_device(adapter, adapter.bind(0), dtype=dtype, bit_flip=flip)


def _role(bit: int, exponent_bits: int, mantissa_bits: int) -> str:
    if bit == exponent_bits + mantissa_bits:
        return "sign"
    if bit >= mantissa_bits:
        return f"exponent {bit - mantissa_bits}"
    return f"mantissa {bit}"


# --- the bound ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(SIGNIFICAND_BITS))
@pytest.mark.parametrize("size", [1, 64, 256, 4096])
def test_input_range_is_the_largest_that_keeps_the_matmul_exact(dtype: torch.dtype, size: int) -> None:
    p = SIGNIFICAND_BITS[dtype]
    if size > 2**p:
        with pytest.raises(ValueError, match=rf"size={size} is too deep .*{dtype}.*allowed: <= {2**p}"):
            exact_input_range(size, dtype)
        return
    m = exact_input_range(size, dtype)
    assert size * m * m <= 2**p
    assert m == MAX_INPUT or size * (m + 1) ** 2 > 2**p


@pytest.mark.parametrize(
    ("dtype", "size"), [(torch.float32, 256), (torch.float16, 256), (torch.bfloat16, 256)]
)
def test_inputs_meet_the_derivation(dtype: torch.dtype, size: int) -> None:
    a, b, reference = probe_inputs(size, dtype)
    assert (a.dtype, b.dtype, reference.dtype) == (dtype, dtype, torch.float64)
    # Every partial sum is bounded by sum_l |a_il||b_lj|: it must be an exact integer multiple of the
    # element's power-of-two scale, at most 2**p of them.
    worst = (a.double().abs() @ b.double().abs()).max().item()
    assert worst <= 2 ** SIGNIFICAND_BITS[dtype] * 4**SCALE_EXP
    assert torch.equal(reference.to(dtype).double(), reference), "the reference is not representable"
    # The scales spread the results over several binades.
    exponents = torch.frexp(reference[reference != 0])[1]
    assert int(exponents.max() - exponents.min()) >= 2 * SCALE_EXP


def test_too_deep_or_unknown_is_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"size=512 .*bfloat16.*<= 256"):
        exact_input_range(512, torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype=torch.int32; allowed: torch.float64"):
        exact_input_range(256, torch.int32)
    adapter = get_adapter("cpu")
    with pytest.raises(ValueError, match=r"size=0"):
        probe_device(adapter, adapter.bind(0), size=0)


# --- bit flips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "exponent_bits", "mantissa_bits"), FORMATS)
def test_every_flipped_bit_is_caught(
    dtype: torch.dtype, exponent_bits: int, mantissa_bits: int, capsys: pytest.CaptureFixture[str]
) -> None:
    healthy = {rank: _probe(family, dtype) for rank, family in enumerate(FAMILIES)}
    assert all(r.ok and r.result_digest is not None for r in healthy.values())
    assert compare_results(healthy).agreed
    _, _, reference = probe_inputs(256, dtype)
    element = int(reference.abs().view(-1).argmax())  # the largest result: the hardest for a tolerance
    rows = []
    for bit in range(1 + exponent_bits + mantissa_bits):
        flipped = _probe("sim_npu", dtype, BitFlip(element=element, bit=bit))
        assert flipped.error is None, flipped.error
        three = {0: healthy[0], 1: flipped, 2: healthy[2]}
        two = {0: healthy[0], 1: flipped}
        by_a = flipped.wrong_result
        by_b = compare_results(three).disagreeing == (1,)
        # With two ranks there is no majority: the disagreement goes to check (a).
        verdict_two = compare_results(two)
        assert not verdict_two.agreed
        assert verdict_two.disagreeing == ((1,) if by_a else ())
        assert verdict_two.undecided == (() if by_a else (0, 1))  # both pass (a): who is wrong is unknown
        assert wrong_ranks(three) == (1,)
        rows.append((bit, _role(bit, exponent_bits, mantissa_bits), by_a, by_b, flipped.max_abs_error))
    with capsys.disabled():
        print(f"\nbit flips of element {element} (reference {reference.view(-1)[element].item():g}), {dtype}")
        print(f"{'bit':>4}  {'position':<12} {'(a) reference':<14} {'(b) bitwise':<12} |error|")
        for bit, role, by_a, by_b, error in rows:
            print(
                f"{bit:>4}  {role:<12} {'caught' if by_a else 'MISSED':<14} {'caught' if by_b else 'MISSED':<12} {error:g}"
            )
    caught_a = {bit for bit, _, by_a, _, _ in rows if by_a}
    caught_b = {bit for bit, _, _, by_b, _ in rows if by_b}
    exponent = set(range(mantissa_bits, mantissa_bits + exponent_bits))
    assert exponent <= caught_a
    assert caught_b == set(range(1 + exponent_bits + mantissa_bits)), "check (b) must catch every bit"
    if dtype == torch.float32:
        assert set(range(mantissa_bits - 10, mantissa_bits)) <= caught_a, "the 10 highest mantissa bits"
    # The bound is 0, so every bit of a non-zero element is caught by (a) as well.
    assert caught_a == caught_b


def test_a_zero_turned_negative_is_caught_by_the_bits_alone() -> None:
    # fp16's inputs are small integers, so some results are exactly zero; -0.0 equals 0.0 as a value.
    _, _, reference = probe_inputs(256, torch.float16)
    zero = int((reference.view(-1) == 0).nonzero()[0])
    healthy = {rank: _probe(family, torch.float16) for rank, family in enumerate(FAMILIES)}
    flipped = _probe("sim_npu", torch.float16, BitFlip(element=zero, bit=15))
    assert flipped.ok and flipped.max_abs_error == 0.0, "(a) compares values: it cannot see a zero's sign"
    assert compare_results({**healthy, 1: flipped}).disagreeing == (1,)


# --- the comparison across ranks ---------------------------------------------------------------------------
def _report(digest: str | None, wrong: bool = False) -> DeviceReport:
    return DeviceReport(
        ok=not wrong,
        wrong_result=wrong,
        max_abs_error=None,
        tolerance=0.0,
        matmul_s=None,
        result_digest=digest,
    )


def test_the_majority_names_the_disagreeing_ranks() -> None:
    reports = {0: _report("x"), 1: _report("y"), 2: _report("x"), 3: _report("z"), 4: _report("x")}
    verdict = compare_results(reports)
    assert (verdict.disagreeing, verdict.undecided) == ((1, 3), ())
    assert verdict.groups == {"x": (0, 2, 4), "y": (1,), "z": (3,)}
    # Check (b) names a rank that check (a) passed.
    assert wrong_ranks(reports) == (1, 3)


def test_without_a_majority_check_a_decides() -> None:
    tie = compare_results({0: _report("x"), 1: _report("x"), 2: _report("y", wrong=True), 3: _report("y")})
    assert (tie.disagreeing, tie.undecided) == ((2,), (0, 1, 3))  # 0, 1 and 3 still differ
    explained = compare_results({0: _report("x"), 1: _report("y", wrong=True)})
    assert (explained.disagreeing, explained.undecided) == ((1,), ())
    both_wrong = compare_results({0: _report("x", wrong=True), 1: _report("y", wrong=True)})
    assert (both_wrong.disagreeing, both_wrong.undecided) == ((0, 1), ())
    unexplained = compare_results({0: _report("x"), 1: _report("y")})
    assert (unexplained.disagreeing, unexplained.undecided) == ((), (0, 1))


def test_ranks_without_a_result_take_no_part() -> None:
    verdict = compare_results({0: _report("x"), 1: _report(None), 2: _report("x")})
    assert verdict.agreed and verdict.disagreeing == ()
    assert compare_results({}).agreed
    assert wrong_ranks({0: _report("x"), 1: _report("x", wrong=True)}) == (1,)


def test_the_report_travels_as_json() -> None:
    bad = _probe(flip=BitFlip(element=3, bit=0))
    data = json.loads(json.dumps(bad.to_dict()))
    assert data["wrong_result"] is True and data["wrong_elements"] == 1
    assert data["result_digest"] != _probe().result_digest


# --- healthy repeats ---------------------------------------------------------------------------------------
def _healthy_repeats(repeats: int) -> None:
    for family in FAMILIES:
        digests = set()
        for _ in range(repeats):
            report = _probe(family)
            assert report.ok and not report.wrong_result, (family, report)
            assert report.max_abs_error == 0.0 and report.wrong_elements == 0
            digests.add(report.result_digest)
        assert len(digests) == 1, f"{family}: the same probe gave {len(digests)} different results"


def test_healthy_probes_raise_nothing() -> None:
    _healthy_repeats(5)


@pytest.mark.slow
def test_no_false_positive_over_200_healthy_probes_per_family() -> None:
    _healthy_repeats(200)
