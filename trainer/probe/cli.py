"""``python -m trainer.probe``: the interconnect and device probes as a standalone command, like nccl-tests.

Under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set) every process joins that
group and rank 0 prints; otherwise the command spawns ``--world-size`` local processes that meet through a
TCPStore on 127.0.0.1 (port chosen by the OS). Either way each rank runs the interconnect probe over the
family's backend and a device probe of its own device.

    python -m trainer.probe --device sim_npu --world-size 3 --sizes 4K,1M,8M --iters 5 --json
    python -m trainer.probe --world-size 3 --slow-rank 1     # injected: names rank 1, exits 1
    python -m trainer.probe --world-size 3 --flip-bit 1:0    # one bit of rank 1's result: names rank 1

Exit code 0 when the interconnect and every device are healthy, 1 when something is degraded or failed,
2 for a bad argument or an unknown device family.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from trainer.devices import get_adapter
from trainer.errors import ConfigError, ExitCode
from trainer.probe.ranks import ProbeOptions, run_spawned, run_torchrun

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``4K``, ``1M``, ``8MiB``, ``1G`` → bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: allowed: a positive integer with K, M or G")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_sizes(text: str) -> tuple[int, ...]:
    """``4K,1M,8M`` → ``(4096, 1048576, 8388608)``; at least one size."""
    sizes = tuple(parse_size(s) for s in text.split(",") if s.strip())
    if not sizes:
        raise argparse.ArgumentTypeError(f"sizes {text!r}: allowed: comma-separated sizes such as 4K,1M,8M")
    return sizes


def _parse_flip(text: str) -> tuple[int, int]:
    """``1:3`` → rank 1, bit 3 (bit 0 is the least significant bit of the float32 encoding)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match or int(match.group(2)) > 31:
        raise argparse.ArgumentTypeError(f"--flip-bit {text!r}: allowed: RANK:BIT with BIT in 0..31")
    return int(match.group(1)), int(match.group(2))


def _parse(argv: list[str] | None) -> tuple[ProbeOptions, int | None, bool]:
    p = argparse.ArgumentParser(prog="python -m trainer.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="device family (cpu, cuda, npu, sim_npu, ...)")
    p.add_argument("--world-size", type=int, help="ranks to spawn (default: 2 on CPU, else device count)")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=(4096, 1 << 20, 8 << 20),
        help="all-reduce sizes, comma-separated (4K,1M,8M)",
    )
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-pairwise", action="store_true", help="skip the ring point-to-point test")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each probe, seconds")
    p.add_argument("--baseline-busbw", type=float, help="expected bus bandwidth, bytes/s")
    p.add_argument("--degraded-fraction", type=float, default=0.8)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--vendor-tools-dir", help="look for nvidia-smi / npu-smi / hccn_tool here before PATH")
    g = p.add_argument_group("injected faults (for demos and tests)")
    g.add_argument("--delay-s", type=float, default=0.0, help="seconds added to every collective")
    g.add_argument("--slow-rank", type=int, help="a rank whose links are slow")
    g.add_argument("--slow-rank-delay-s", type=float, default=0.05)
    g.add_argument("--error-rate", type=float, default=0.0, help="probability that a collective fails")
    g.add_argument("--wrong-compute-rank", type=int, help="a rank whose matmul is corrupted")
    g.add_argument(
        "--flip-bit", type=_parse_flip, help="RANK:BIT, one bit flipped in that rank's matmul result"
    )
    a = p.parse_args(argv)
    if a.iters < 1 or a.warmup < 0 or a.timeout <= 0 or not 0 < a.degraded_fraction <= 1:
        p.error("allowed: --iters >= 1, --warmup >= 0, --timeout > 0, --degraded-fraction in (0, 1]")
    if not 0 <= a.error_rate <= 1 or a.delay_s < 0 or a.slow_rank_delay_s < 0:
        p.error("allowed: --error-rate in [0, 1], --delay-s >= 0, --slow-rank-delay-s >= 0")
    if a.world_size is not None and a.world_size < 1:
        p.error(f"--world-size={a.world_size}: allowed: an integer >= 1")
    options = ProbeOptions(
        device=a.device,
        sizes_bytes=a.sizes,
        iters=a.iters,
        warmup=a.warmup,
        pairwise=not a.no_pairwise,
        timeout_s=a.timeout,
        baseline_busbw=a.baseline_busbw,
        degraded_fraction=a.degraded_fraction,
        delay_s=a.delay_s,
        slow_rank=a.slow_rank,
        slow_rank_delay_s=a.slow_rank_delay_s,
        error_rate=a.error_rate,
        wrong_compute_rank=a.wrong_compute_rank,
        flip_bit=a.flip_bit,
        vendor_tools_dir=a.vendor_tools_dir,
    )
    return options, a.world_size, a.json


def format_table(summary: dict[str, Any]) -> str:
    """The summary as nccl-tests-like text."""
    lines = []
    ic = summary["interconnect"]
    if ic is not None:
        lines += [
            f"# {summary['device_family']}: backend {ic['backend']}, {ic['world_size']} ranks, "
            f"probe {ic['duration_s']:.2f} s" + ("" if ic["ok"] else f"  FAILED: {ic['error']}"),
            f"# {'size (B)':>12} {'time (us)':>12} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}",
        ]
        for pt in ic["points"]:
            lines.append(
                f"  {pt['bytes']:>12} {pt['seconds'] * 1e6:>12.1f} {pt['algbw_bytes_per_s'] / 1e9:>13.3f} "
                f"{pt['busbw_bytes_per_s'] / 1e9:>13.3f}"
            )
        if ic["small_message_latency_s"] is not None:
            lines.append(f"# small-message latency: {ic['small_message_latency_s'] * 1e6:.1f} us")
        for link in ic["links"]:
            lines.append(
                f"# link {link['src']}<->{link['dst']}: {link['bandwidth_bytes_per_s'] / 1e9:.3f} GB/s "
                f"({link['bytes']} B one way in {link['seconds'] * 1e6:.1f} us)"
            )
        slowest = ic["slowest_link"]
        if slowest is not None:
            lines.append(f"# slowest link: {slowest['src']}<->{slowest['dst']}; slow rank: {ic['slow_rank']}")
    lines.append(f"# {'rank':>4} {'ok':>5} {'matmul (ms)':>12} {'max abs err':>12}  note")
    for rank, d in summary["devices"].items():
        matmul = "-" if d["matmul_s"] is None else f"{d['matmul_s'] * 1e3:.3f}"
        err = "-" if d["max_abs_error"] is None else f"{d['max_abs_error']:.3g}"
        note = "WRONG RESULT" if d["wrong_result"] else (d["error"] or "")
        if int(rank) in summary["bitwise_disagreeing_ranks"] and not d["wrong_result"]:
            note = "RESULT BITS DIFFER from the other ranks'"
        if d["device_unhealthy"]:
            fatal = [
                f"{f['tool']}: {f['detail']}" for f in d["vendor"]["findings"] if f["severity"] == "fatal"
            ]
            note = ("; ".join([note, *fatal]) if note else "; ".join(fatal)) + " (VENDOR TOOLS)"
        lines.append(f"  {rank:>4} {d['ok']!s:>5} {matmul:>12} {err:>12}  {note}")
    for rank, error in summary["rank_errors"].items():
        lines.append(f"# rank {rank}: {error}")
    if summary["slow_device_ranks"]:
        lines.append(f"# slow device ranks (informational): {summary['slow_device_ranks']}")
    verdict = summary["assessment"]
    reason = "no interconnect report" if verdict is None else verdict["reason"]
    lines.append(f"# {'healthy' if summary['healthy'] else 'NOT HEALTHY'}: {reason}")
    return "\n".join(lines)


def _default_world_size(device: str) -> int:
    adapter = get_adapter(device)
    return 2 if adapter.torch_device_type() == "cpu" else max(1, adapter.device_count())


def main(argv: list[str] | None = None) -> int:
    """Run the probes; print; the exit code (0 healthy, 1 degraded or failed, 2 bad arguments)."""
    options, world, as_json = _parse(argv)
    try:
        adapter = get_adapter(options.device)
    except ConfigError as exc:
        print(f"trainer.probe: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if not adapter.is_available():
        print(f"trainer.probe: {options.device} unavailable: {adapter.unavailable_reason()}", file=sys.stderr)
        return ExitCode.FAILED
    if all(v in os.environ for v in _TORCHRUN_VARS):
        summary, healthy = run_torchrun(options)
    else:
        summary = run_spawned(options, world or _default_world_size(options.device))
        healthy = bool(summary["healthy"])
    if summary is not None:
        print(json.dumps(summary, indent=2) if as_json else format_table(summary), flush=True)
    return ExitCode.FINISHED if healthy else ExitCode.FAILED
