"""The device probe on every family this host has: healthy repeats, cost, and the bit-flip table.

For each family (the CPU-backed ones always, ``cuda`` / ``npu`` where available) and dtype, the probe runs
``--repeats`` times on device 0 and the script reports: false positives of check (a) (against the float64
reference) and of check (b) (result digests that differ between repeats), the median probe and matmul time,
the median time of the bit-level checks themselves (``check_s``: host copy, comparison, digest), and the training time the in-flight probing must have
between two probes to stay within ``probes.max_cost_fraction``. With ``--bit-table`` it also flips each bit of
the largest fp32 result element through the fault seam and says which check catches it; on CUDA it repeats
fp32 with TF32 allowed; and it reports what the vendors' tools say about device 0. Prints one JSON.

    .venv/bin/python scripts/bench/device_probe.py [--repeats 200] [--bit-table] [--families cpu cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from trainer.config.operations import ProbesConfig
from trainer.devices import get_adapter
from trainer.faults import BitFlip
from trainer.health.device import compare_results, probe_device, probe_inputs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def measure(family: str, dtype_name: str, repeats: int) -> dict[str, Any]:
    adapter = get_adapter(family)
    device = adapter.bind(0)
    dtype = DTYPES[dtype_name]
    reports = [probe_device(adapter, device, dtype=dtype) for _ in range(repeats)]
    errors = sorted({r.error for r in reports if r.error is not None})
    digests = {r.result_digest for r in reports if r.result_digest is not None}
    probe_s = statistics.median(r.duration_s for r in reports)
    budget = ProbesConfig().max_cost_fraction
    return {
        "family": family,
        "dtype": dtype_name,
        "device": adapter.describe().get("device_name", str(device)),
        "repeats": repeats,
        "false_positives_a": sum(r.wrong_result for r in reports),
        "distinct_digests_b": len(digests),
        "max_abs_error": max((r.max_abs_error or 0.0) for r in reports),
        "bound": reports[0].tolerance,
        "errors": errors,
        "probe_s_median": probe_s,
        "matmul_s_median": statistics.median(r.matmul_s or 0.0 for r in reports),
        "check_s_median": statistics.median(r.check_s or 0.0 for r in reports),
        "max_cost_fraction": budget,
        "train_s_between_probes_needed": probe_s / budget,
    }


def bit_table(family: str) -> list[dict[str, Any]]:
    adapter = get_adapter(family)
    device = adapter.bind(0)
    healthy = {rank: probe_device(adapter, device) for rank in range(3)}
    element = int(probe_inputs(256, torch.float32)[2].abs().view(-1).argmax())
    rows = []
    for bit in range(32):
        flipped = probe_device(adapter, device, bit_flip=BitFlip(element=element, bit=bit))
        verdict = compare_results({**healthy, 1: flipped})
        role = "sign" if bit == 31 else (f"exponent {bit - 23}" if bit >= 23 else f"mantissa {bit}")
        rows.append(
            {"bit": bit, "position": role, "a": flipped.wrong_result, "b": verdict.disagreeing == (1,)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--families", nargs="+", default=None, help="default: cpu, sim_npu, sim_cuda + any real"
    )
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--bit-table", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: allowed: an integer >= 1")
    families = args.families or ["cpu", "sim_npu", "sim_cuda"] + [
        f for f in ("cuda", "npu") if get_adapter(f).is_available()
    ]
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "results": [measure(f, d, args.repeats) for f in families for d in args.dtypes],
    }
    if "cuda" in families:
        # fp32 again with TF32 matmuls allowed (inputs rounded to 11 significand bits): still exact.
        torch.backends.cuda.matmul.allow_tf32 = True
        out["results_tf32"] = measure("cuda", "float32", args.repeats)
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.bit_table:
        out["bit_table"] = {f: bit_table(f) for f in families}
    for family in families:  # what the vendors' own tools say on this host (absent: skipped, with why)
        adapter = get_adapter(family)
        out.setdefault("vendor_health", {})[family] = adapter.vendor_health(adapter.bind(0), 10.0).to_dict()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
