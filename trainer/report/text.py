"""A run's story as text a person reads top to bottom: outcome, families, events, goodput."""

from __future__ import annotations

import textwrap
from typing import Any

WIDTH, MIN_DETAIL_CHARS = 110, 40  # characters of a printed line; of a failure's shortened detail


def format_report(r: dict[str, Any]) -> str:
    """The report as lines a person reads top to bottom: outcome, families, events, goodput."""
    lines = [f"run {r['name'] or '?'} ({r['run_dir']}): {outcome_phrase(r)}"]
    if r["driver_starts"] > 1:
        lines.append(f"driver started {r['driver_starts']} times (re-launched into the same run directory)")
    lines.append("families:")
    for s in r["segments"]:
        steps = f"steps {s['first_step']}-{s['last_step']}" if s["first_step"] is not None else "no steps"
        lines.append(f"  {s['family']:<10} {steps} ({len(s['points'])} heartbeats)")
    lines += _section(
        f"failures ({len(r['failure_events'])})", [_failure_line(f) for f in r["failure_events"]]
    )
    lines += _section(f"decisions ({len(r['decisions'])})", [_decision_line(d) for d in r["decisions"]])
    lines += _section(
        f"recoveries ({len(r['recovery_events'])})", [_recovery_line(e) for e in r["recovery_events"]]
    )
    lines += _section(f"hand-overs ({len(r['handovers'])})", [_handover_line(h) for h in r["handovers"]])
    lines.append(_goodput_line(r["goodput"]))
    if r["outcome"] == "finished":
        lines.append(
            f"final: step {r['final_step']}, loss {_f(r['final_loss'])}, held-out loss {_f(r['final_eval_loss'])}"
        )
    if r["abort_reason"]:
        lines.append(_wrap(f"aborted: {r['abort_reason']}", "  "))
    return "\n".join(lines)


def outcome_phrase(r: dict[str, Any]) -> str:
    if r["outcome"] == "finished":
        return f"finished at step {r['final_step']} on {r['last_family']}, final loss {_f(r['final_loss'])}"
    if r["outcome"] == "aborted":
        return f"aborted after step {r['last_step']} on {r['last_family']}"
    return f"unfinished: last heartbeat at step {r['last_step']}"


def _section(title: str, items: list[str]) -> list[str]:
    return [f"{title}:" if items else f"{title}: none", *items]


def _failure_line(f: dict[str, Any]) -> str:
    ranks = f" ranks {f['ranks']}" if f.get("ranks") else ""
    action = f" -> {f['action']}" if f.get("action") else ""
    head = f"  step {f['step']}: {f['kind']} on {f['family']}{ranks}{action}: "
    room = max(WIDTH - len(head), MIN_DETAIL_CHARS)  # the decision below carries the full text
    return head + (textwrap.shorten(f.get("detail") or "", room, placeholder=" ...") or "-")


def _decision_line(d: dict[str, Any]) -> str:
    target = f" -> {d['family']}" if d.get("family") else ""
    return _wrap(f"step {d['step']}: {d['action']}{target}: {d['reason']}", "    ", first="  ")


def _recovery_line(e: dict[str, Any]) -> str:
    replaced = f", replaced ranks {e['replaced_ranks']}" if e.get("replaced_ranks") else ""
    seconds = f" in {e['recover_s']:.1f} s" if e.get("recover_s") is not None else ""
    return f"  step {e['step']} on {e['family']}: {e['action']} from {e['state_from']}{replaced}{seconds}"


def _handover_line(h: dict[str, Any]) -> str:
    head = f"  {h['from']} -> {h['to']} at step {h['step']} (t+{h['at_s']:.1f} s): "
    if h["completed"]:
        head += f"{h['handover_s']:.1f} s from decision to first step; "
    else:
        head += "never completed; "
    losses = f"loss before {_f(h['loss_before'])}, after {_f(h['loss_after'])}"
    return _wrap(
        f"{head}parity {parity_verdict(h['parity'])}; {losses}; state from {h['state_from']}", "    "
    )


def parity_verdict(p: dict[str, Any] | None) -> str:
    """``passed (held-out loss a vs b, rtol r)``, ``FAILED (...)``, or why there was no check."""
    if p is None:
        return "not run"
    if not p["checked"]:
        return "not checked (no reference loss)"
    figures = f"held-out loss {p['observed_loss']:.6f} vs {p['reference_loss']:.6f}, rtol {p['rtol']:g}"
    return f"{'passed' if p['passed'] else 'FAILED'} ({figures})"


def _goodput_line(g: dict[str, Any] | None) -> str:
    if not g:
        return "goodput: not recorded"
    buckets = sorted(((v, k) for k, v in g["badput_s"].items() if v >= 0.05), reverse=True)
    badput = ", ".join(f"{k} {v:.1f} s" for v, k in buckets) or "none"
    text = (
        f"goodput: {g['ratio']:.1%} of {g['wall_s']:.1f} s wall time (productive {g['productive_s']:.1f} s)"
    )
    return _wrap(f"{text}; badput: {badput}", "  ")


def _wrap(text: str, indent: str, first: str = "") -> str:
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=indent)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
