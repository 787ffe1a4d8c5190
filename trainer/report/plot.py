"""A run's loss curve as a PNG: one colour per device family, marked at failures, recoveries and hand-overs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.report.text import outcome_phrase, parity_verdict

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


def family_colours(families: Sequence[str]) -> dict[str, str]:
    """The plot colour of each family in ``families``: fixed for known families, spares for others."""
    spares = iter(SPARE_COLOURS)
    return {f: FAMILY_COLOURS.get(f) or next(spares, "#000000") for f in dict.fromkeys(families)}


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
