"""A run's story, told from its journal, and its loss curve as a PNG.

``python -m trainer.report RUN_DIR [--png PATH] [--json]`` reads ``RUN_DIR/journal.jsonl`` and prints which
device families trained which steps, the failures, the decisions and their reasons, recoveries, hand-overs
with their parity checks, goodput and the final loss (``--json``: the same as one JSON object). It always
writes the loss curve, coloured by family and marked at failures, recoveries and hand-overs, to ``--png``
(default ``RUN_DIR/loss.png``). A missing or empty journal exits with code 2 and names the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import ExitCode, TrainerError
from trainer.journal import Journal
from trainer.summary import summarize

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Fixed colours for the families this toolkit knows, so every plot of every run agrees; others get the
# spares in order of appearance. Red, black and purple are kept for the event markers.
FAMILY_COLOURS = {
    "sim_npu": "#ff7f0e",
    "sim_cuda": "#1f77b4",
    "npu": "#8c564b",
    "cuda": "#2ca02c",
    "cpu": "#7f7f7f",
}
SPARE_COLOURS = ("#17becf", "#bcbd22", "#e377c2", "#aec7e8", "#98df8a")
FAILURE_COLOUR, HANDOVER_COLOUR, RECOVERY_COLOUR = "#d62728", "#000000", "#9467bd"
WIDTH, MIN_DETAIL_CHARS = 110, 40  # characters of a printed line; of a failure's shortened detail


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


def family_colours(families: Sequence[str]) -> dict[str, str]:
    """The plot colour of each family in ``families``: fixed for known families, spares for others."""
    spares = iter(SPARE_COLOURS)
    return {f: FAMILY_COLOURS.get(f) or next(spares, "#000000") for f in dict.fromkeys(families)}


# --- the story as data ----------------------------------------------------------------------------------
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


# --- the story as text ----------------------------------------------------------------------------------
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


# --- the loss curve -------------------------------------------------------------------------------------
def plot(r: dict[str, Any], path: Path) -> Path:
    """Write the loss curve of report ``r`` to ``path`` (PNG): one colour per family, event markers."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    colours = family_colours([s["family"] for s in r["segments"]])
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    try:
        _draw_segments(ax, r["segments"], colours)
        _draw_events(ax, r)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss at each heartbeat (mean over ranks)")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{r['name'] or 'run'}: {outcome_phrase(r)}\n{_subtitle(r)}", fontsize=11)
        handles = _legend_handles(r, colours)
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _subtitle(r: dict[str, Any]) -> str:
    families = " -> ".join(s["family"] for s in r["segments"]) or "no family"
    goodput = f"goodput {r['goodput']['ratio']:.1%}" if r["goodput"] else "goodput not recorded"
    events = f"{_count(len(r['failure_events']), 'failure')}, {_count(len(r['handovers']), 'hand-over')}"
    return f"{families}; {events}; {goodput}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _draw_segments(ax: Axes, segments: list[dict[str, Any]], colours: dict[str, str]) -> None:
    previous: list[float] | None = None
    for seg in segments:
        points = seg["points"]
        if not points:
            continue
        ax.axvspan(
            seg["first_step"] - 0.5, seg["last_step"] + 0.5, color=colours[seg["family"]], alpha=0.07, lw=0
        )
        if previous is not None:  # a thin link, so the curve reads as one run across families
            ax.plot([previous[0], points[0][0]], [previous[1], points[0][1]], color="#bbbbbb", lw=1, ls="--")
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, color=colours[seg["family"]], lw=2.5, marker="o", ms=4)
        previous = points[-1]
    if previous is None:
        ax.text(0.5, 0.5, "no heartbeats recorded", transform=ax.transAxes, ha="center", color="#777777")


def _draw_events(ax: Axes, r: dict[str, Any]) -> None:
    """Vertical lines with a marker and a label: failures and recoveries below, hand-overs on top."""
    by_step: dict[int, list[str]] = {}
    for f in r["failure_events"]:
        name = f"{f['kind']} -> {f['action']}" if f["action"] else f["kind"]
        by_step.setdefault(f["step"], []).append(name)
    for step, kinds in by_step.items():
        label = ", ".join(f"{k} x{kinds.count(k)}" if kinds.count(k) > 1 else k for k in dict.fromkeys(kinds))
        _event_line(ax, step, FAILURE_COLOUR, ":", "X", label, left=True)
    for e in r["recovery_events"]:  # often at a failure's step: marker higher, label on the other side
        _event_line(ax, e["step"], RECOVERY_COLOUR, "-.", "^", f"recovered: {e['action']}", left=False)
    for h in r["handovers"]:
        ax.axvline(h["step"], color=HANDOVER_COLOUR, ls="--", lw=1.5)
        _mark(ax, h["step"], 0.97, "D", HANDOVER_COLOUR)
        took = f"{h['handover_s']:.1f} s" if h["completed"] else "not completed"
        verdict = parity_verdict(h["parity"]).split(" (")[0]
        ax.annotate(
            f"hand-over {h['from']} -> {h['to']}\n{took}, parity {verdict}",
            (h["step"], 0.97),
            xycoords=ax.get_xaxis_transform(),
            xytext=(8, 0),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=8,
            bbox={"fc": "white", "ec": "#999999", "alpha": 0.9},
        )


def _event_line(ax: Axes, step: int, colour: str, style: str, marker: str, label: str, *, left: bool) -> None:
    """A vertical line at ``step``, ``marker`` near its foot, ``label`` running up on its left or right."""
    ax.axvline(step, color=colour, ls=style, lw=1.5)
    foot = 0.03 if left else 0.09
    _mark(ax, step, foot, marker, colour)
    ax.annotate(
        label,
        (step, foot + 0.04),
        xycoords=ax.get_xaxis_transform(),
        xytext=(-4 if left else 4, 0),
        textcoords="offset points",
        rotation=90,
        ha="right" if left else "left",
        va="bottom",
        fontsize=8,
        color=colour,
        zorder=1,  # under the curve, which stays whole where the two cross
    )


def _mark(ax: Axes, step: int, height: float, marker: str, colour: str) -> None:
    """``marker`` at ``step``, ``height`` up the axes (0 bottom, 1 top) whatever the loss range."""
    ax.plot(
        [step], [height], transform=ax.get_xaxis_transform(), marker=marker, ms=9, color=colour, clip_on=False
    )


def _legend_handles(r: dict[str, Any], colours: dict[str, str]) -> list[Any]:
    from matplotlib.lines import Line2D

    handles: list[Any] = [
        Line2D([], [], color=c, lw=2.5, marker="o", ms=4, label=f) for f, c in colours.items()
    ]
    if r["failure_events"]:
        handles.append(Line2D([], [], color=FAILURE_COLOUR, ls=":", marker="X", ms=8, label="failure"))
    if r["recovery_events"]:
        handles.append(Line2D([], [], color=RECOVERY_COLOUR, ls="-.", marker="^", ms=8, label="recovery"))
    if r["handovers"]:
        handles.append(Line2D([], [], color=HANDOVER_COLOUR, ls="--", marker="D", ms=7, label="hand-over"))
    return handles


# --- command line ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds journal.jsonl)")
    parser.add_argument("--png", type=Path, default=None, help="where to write the plot (RUN_DIR/loss.png)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    try:
        events = load_events(args.run_dir)
    except JournalMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)  # a bad argument, like a bad setting
    report = build_report(events, args.run_dir)
    png = plot(report, args.png or args.run_dir / "loss.png")
    if args.json:
        print(json.dumps({**report, "png": str(png)}, indent=2, default=str))
    else:
        print(f"{format_report(report)}\nplot: {png}")
    return int(ExitCode.FINISHED)


if __name__ == "__main__":
    sys.exit(main())
