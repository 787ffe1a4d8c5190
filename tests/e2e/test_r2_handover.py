"""The R2 story end to end: start on sim_npu, its interconnect degrades, the run moves to sim_cuda.

The run must finish on sim_cuda with a held-out loss matching an uninterrupted single-family run over the
same samples, and its journal must show the degraded probes, the decision and its reason, the hand-over
and a passed parity check — and every step trained exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainer.config import Config
from trainer.errors import ExitCode
from trainer.job import run
from trainer.journal import Journal
from trainer.summary import summarize

pytestmark = pytest.mark.usefixtures("local_ray")


def _trained_steps(events: list[dict[str, Any]]) -> list[int]:
    """Every step whose update is in the final state: heartbeats, plus steps kept through snapshots."""
    steps: list[int] = []
    for e in events:
        if e["event"] == "heartbeat":
            steps.extend(range(e["first_step"], e["step"] + 1))
        elif e["event"] in ("recovered", "handover_completed") and e.get("kept_steps"):
            first, last = e["kept_steps"]
            steps.extend(range(first, last + 1))
    return sorted(steps)


# Two whole runs (300 steps with a hand-over, and the reference): over the suite's 300 s on a busy 2-core host.
@pytest.mark.timeout(900)
def test_r2_run_hands_over_to_sim_cuda_and_matches_an_uninterrupted_run(
    r2_handover_run: tuple[Config, Path], make_config: Callable[..., Config], tmp_path: Path
) -> None:
    r2, run_dir = r2_handover_run
    events = Journal(run_dir / "journal.jsonl").read()

    def of(name: str) -> list[dict[str, Any]]:
        return [e for e in events if e["event"] == name]

    degraded = [p for p in of("probe") if p["family"] == "sim_npu" and p["degraded"]]
    assert degraded, "the degrading sim_npu interconnect was never flagged by a probe"
    assert all(
        p["busbw_bytes_per_s"] < r2.probes.degraded_fraction * p["baseline_bytes_per_s"] for p in degraded
    )
    [fallback] = [d for d in of("decision") if d["action"] == "fallback"]
    assert fallback["family"] == "sim_cuda" and "sim_npu" in fallback["reason"]
    [started] = of("handover_started")
    assert (started["from_family"], started["to_family"]) == ("sim_npu", "sim_cuda")
    [parity] = of("parity_check")
    assert parity["checked"] and parity["passed"]
    assert parity["observed_loss"] == pytest.approx(parity["reference_loss"], rel=parity["rtol"])
    [done] = of("handover_completed")
    assert done["to_family"] == "sim_cuda" and done["handover_s"] > 0
    [finished] = of("run_finished")
    assert finished["family"] == "sim_cuda" and finished["step"] == r2.train.steps

    # No sample trained twice or skipped: steps map one-to-one onto samples.
    assert _trained_steps(events) == list(range(1, r2.train.steps + 1))

    # The same samples, uninterrupted, in one process on one family.
    reference = make_config("device=sim_cuda", f"train.steps={r2.train.steps}", "checkpoint.interval_steps=0")
    assert run(reference, run_dir=tmp_path / "reference") == ExitCode.FINISHED
    [ref_finished] = [
        e for e in Journal(tmp_path / "reference" / "journal.jsonl").read() if e["event"] == "run_finished"
    ]
    assert finished["eval_loss"] == pytest.approx(ref_finished["eval_loss"], rel=2e-2)

    summary = summarize(events)
    assert summary["families"] == ["sim_npu", "sim_cuda"] and summary["outcome"] == "finished"
    assert summary["handovers"][0]["parity"]["passed"]
