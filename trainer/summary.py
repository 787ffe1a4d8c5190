"""A run's story in a few lines, read back from its journal: families, failures, decisions, hand-overs."""

from __future__ import annotations

from collections import Counter
from typing import Any


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of the run recorded in ``events`` (a journal's entries, oldest first)."""

    def of(name: str) -> list[dict[str, Any]]:
        return [e for e in events if e["event"] == name]

    finished = of("run_finished")
    aborted = of("run_aborted")
    families: list[str] = []
    for e in of("group_started"):
        if not families or families[-1] != e["family"]:
            families.append(e["family"])
    handovers = []
    heartbeats = of("heartbeat")
    for done in of("handover_completed"):
        before = [h for h in heartbeats if h["family"] == done["from_family"] and h["time"] < done["time"]]
        parity = [
            p for p in of("parity_check") if p["to_family"] == done["to_family"] and p["time"] <= done["time"]
        ]
        handovers.append(
            {
                "from": done["from_family"],
                "to": done["to_family"],
                "step": done["state_step"],
                "handover_s": done["handover_s"],
                "loss_before": before[-1]["loss"] if before else None,
                "loss_after": done.get("first_loss"),
                "parity": parity[-1] if parity else None,
            }
        )
    return {
        "outcome": _outcome(events),
        "families": families,
        "failures": dict(Counter(e["kind"] for e in of("failure"))),
        "decisions": [
            {"action": d["action"], "reason": d["reason"], "step": d.get("step")} for d in of("decision")
        ],
        "recoveries": len(of("recovered")),
        # Light in-flight probes that look degraded are re-checked by a full one; count the verdicts.
        "degraded_probes": sum(1 for p in of("probe") if p.get("degraded") and p["phase"] != "in-flight"),
        "handovers": handovers,
        "final_step": finished[-1]["step"] if finished else None,
        "final_loss": finished[-1]["loss"] if finished else None,
        "final_eval_loss": finished[-1].get("eval_loss") if finished else None,
        "abort_reason": aborted[-1]["reason"] if aborted else None,
        "goodput": of("goodput")[-1] if of("goodput") else None,
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"outcome: {s['outcome']}; families: {' -> '.join(s['families']) or '-'}"]
    failures = ", ".join(f"{k} x{v}" for k, v in s["failures"].items()) or "none"
    lines.append(
        f"failures: {failures}; recoveries: {s['recoveries']}; degraded probes: {s['degraded_probes']}"
    )
    for h in s["handovers"]:
        parity = h["parity"]
        verdict = (
            "passed" if parity and parity["passed"] else "FAILED" if parity and parity["checked"] else "n/a"
        )
        lines.append(
            f"hand-over {h['from']} -> {h['to']} at step {h['step']}: {h['handover_s']:.1f} s from decision to "
            f"first step; loss before {_f(h['loss_before'])}, after {_f(h['loss_after'])}; parity {verdict}"
        )
    if s["outcome"] == "finished":
        lines.append(
            f"final step {s['final_step']}: loss {_f(s['final_loss'])}, held-out loss {_f(s['final_eval_loss'])}"
        )
    if s["goodput"]:
        g = s["goodput"]
        buckets = ", ".join(f"{k} {v:.1f} s" for k, v in g["badput_s"].items() if v >= 0.05) or "none"
        lines.append(f"goodput: {g['ratio']:.1%} of {g['wall_s']:.1f} s wall time; badput: {buckets}")
    if s["abort_reason"]:
        lines.append(f"aborted: {s['abort_reason']}")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _outcome(events: list[dict[str, Any]]) -> str:
    """How the newest session of the run ended: finished, failed, aborted, preempted (and the step it saved),
    or unfinished (still running, or its driver was killed)."""
    ends = [e for e in events if e["event"] in ("run_finished", "run_failed", "run_aborted", "preempted")]
    if not ends:
        return "unfinished"
    last = ends[-1]
    if last["event"] == "preempted":
        saved = last.get("saved_step")
        return f"preempted at step {last['step']} ({'saved' if saved is not None else 'nothing saved'})"
    return {"run_finished": "finished", "run_failed": "failed"}.get(last["event"], "aborted")
