"""A run's story as data: the journal's entries gathered into what a reader needs, event by event."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError
from trainer.journal import Journal
from trainer.summary import summarize


class JournalMissingError(TrainerError):
    """``RUN_DIR/journal.jsonl`` does not exist or holds no complete entry: there is nothing to report."""


def load_events(run_dir: Path) -> list[dict[str, Any]]:
    """The journal's entries, oldest first; raises :class:`JournalMissingError` naming the file."""
    path = Path(run_dir) / "journal.jsonl"
    if not path.is_file():
        raise JournalMissingError(
            f"no journal at {path}: RUN_DIR must be a run directory of `python -m trainer`"
        )
    events = Journal(path).read()
    if not events:
        raise JournalMissingError(f"journal {path} is empty: the run recorded nothing yet")
    return events


def build_report(events: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """:func:`trainer.summary.summarize` plus what a reader needs to follow the run event by event.

    Adds the run's name, the step ranges each family trained (with the heartbeat losses), every failure,
    decision and recovery with its step, and hand-overs with their start time and parity (attempts that
    never completed included). ``handovers`` replaces the summary's list with that richer one.
    """
    started = _of(events, "run_started")
    segments = _segments(events)
    return {
        **summarize(events),
        "name": started[0].get("name") if started else None,
        "run_dir": str(run_dir),
        "driver_starts": len(started),
        "last_step": max((e["step"] for e in _of(events, "heartbeat")), default=0),
        "last_family": segments[-1]["family"] if segments else None,
        "segments": segments,
        "failure_events": _failures(events),
        "decisions": [
            {k: d.get(k) for k in ("step", "action", "family", "reason")} for d in _of(events, "decision")
        ],
        "recovery_events": [
            {k: r.get(k) for k in ("step", "family", "action", "replaced_ranks", "state_from", "recover_s")}
            for r in _of(events, "recovered")
        ],
        "handovers": _handovers(events, (started or events)[0]["time"]),
    }


def _of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def _failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every failure, with the action of the decision the controller journalled right after it."""
    found = []
    for i, f in enumerate(events):
        if f["event"] == "failure":
            decision = next((d for d in events[i + 1 :] if d["event"] == "decision"), {})
            fields = {k: f.get(k) for k in ("step", "kind", "family", "ranks", "detail")}
            found.append({**fields, "action": decision.get("action")})
    return found


def _segments(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stretches on one family: its step range and the (step, loss) of each heartbeat.

    A new stretch begins when a group of another family starts (or, where no group is journalled, a
    heartbeat names another family); a restart on the same family continues the stretch.
    """
    segments: list[dict[str, Any]] = []
    for e in events:
        family = e.get("family")
        if e["event"] not in ("group_started", "heartbeat") or family is None:
            continue
        if not segments or segments[-1]["family"] != family:
            segments.append({"family": family, "first_step": None, "last_step": None, "points": []})
        if e["event"] == "heartbeat":
            seg = segments[-1]
            seg["first_step"] = e["first_step"] if seg["first_step"] is None else seg["first_step"]
            seg["last_step"] = e["step"]
            if e.get("loss") is not None:
                seg["points"].append([e["step"], e["loss"]])
    return segments


def _handovers(events: list[dict[str, Any]], start: float) -> list[dict[str, Any]]:
    """Every hand-over attempt, matched with the parity check and completion that followed it."""
    found = []
    starts = [i for i, e in enumerate(events) if e["event"] == "handover_started"]
    for i, end in pairwise([*starts, len(events)]):
        begun, later = events[i], events[i:end]  # up to the next attempt, which may target the same family
        parity = next((e for e in later if e["event"] == "parity_check"), None)
        done = next((e for e in later if e["event"] == "handover_completed"), None)
        before = [h["loss"] for h in _of(events[:i], "heartbeat") if h["family"] == begun["from_family"]]
        found.append(
            {
                "from": begun["from_family"],
                "to": begun["to_family"],
                "step": done["state_step"] if done else begun["step"],
                "at_s": begun["time"] - start,
                "completed": done is not None,
                "handover_s": done["handover_s"] if done else None,
                "state_from": done["state_from"] if done else parity["state_from"] if parity else None,
                "loss_before": before[-1] if before else None,
                "loss_after": done.get("first_loss") if done else None,
                "parity": parity,
            }
        )
    return found
