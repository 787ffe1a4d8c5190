"""``python -m trainer.report RUN_DIR``: the run's story in text and a loss plot a person can read.

Synthetic journals (written with the real :class:`~trainer.journal.Journal`) cover a hand-over and an
aborted run in well under a second each; one real R2 run checks the report against what the trainer
actually journals.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.config import Config
from trainer.errors import ExitCode
from trainer.journal import Journal
from trainer.report import family_colours, main

FALLBACK_REASON = (
    "2 degraded interconnect probes on sim_npu within 600 s (fault_tolerance.max_degraded_probes=2); "
    "hand the run over to sim_cuda"
)
ABORT_REASON = "3 collective failures on sim_cuda within 600 s and no family left to fall back to"
LONG_DETAIL = "in-flight probe: bus bandwidth 0.0771 GB/s is below 0.3 x baseline 1.68 GB/s; " * 5


def _heartbeats(journal: Journal, family: str, first: int, last: int, loss: float) -> float:
    """Heartbeats of 25 steps each over [first, last], the loss falling; returns the last loss."""
    for start in range(first, last + 1, 25):
        loss *= 0.95
        journal.record(
            "heartbeat",
            first_step=start,
            step=start + 24,
            family=family,
            loss=loss,
            busy_s=0.5,
            step_time_s=0.02,
        )
    return loss


def _goodput(journal: Journal, ratio: float, **badput: float) -> None:
    journal.record("goodput", wall_s=20.0, productive_s=20.0 * ratio, ratio=ratio, badput_s=badput)


def _degraded_probe(j: Journal, step: int, action: str, reason: str, target: str | None = None) -> None:
    j.record("probe", phase="in-flight", family="sim_npu", step=step, degraded=True, busbw_bytes_per_s=7e7)
    j.record("failure", kind="degraded_probe", family="sim_npu", ranks=[], step=step, detail=LONG_DETAIL)
    j.record("decision", action=action, reason=reason, ranks=[], family=target, step=step)


def _handover_run(run_dir: Path) -> Path:
    """sim_npu trains steps 1-100, degrades twice, hands over to sim_cuda, which finishes at step 200."""
    j = Journal(run_dir / "journal.jsonl")
    j.record("run_started", run_dir=str(run_dir), family="sim_npu", world_size=2, name="synthetic_r2")
    j.record("group_started", family="sim_npu", world_size=2, step=0)
    loss = _heartbeats(j, "sim_npu", 1, 75, 1.2)
    _degraded_probe(j, 75, "continue", "degraded probe on sim_npu (1/2 within the window): keep training")
    loss = _heartbeats(j, "sim_npu", 76, 100, loss)
    _degraded_probe(j, 100, "fallback", FALLBACK_REASON, target="sim_cuda")
    j.record(
        "handover_started", from_family="sim_npu", to_family="sim_cuda", step=100, reason=FALLBACK_REASON
    )
    j.record("group_started", family="sim_cuda", world_size=2, step=100)
    state_from = "peer snapshot from rank 0 on sim_npu"
    j.record(
        "parity_check",
        step=100,
        from_family="sim_npu",
        to_family="sim_cuda",
        state_from=state_from,
        reference_loss=1.0004605,
        observed_loss=1.0004605,
        rtol=1e-4,
        checked=True,
        passed=True,
    )
    j.record(
        "handover_completed",
        from_family="sim_npu",
        to_family="sim_cuda",
        state_from=state_from,
        state_step=100,
        kept_steps=None,
        step=101,
        handover_s=5.27,
        first_loss=loss,
    )
    loss = _heartbeats(j, "sim_cuda", 101, 200, loss)
    _goodput(j, 0.6, startup=3.0, handover=5.2, probe=0.5, checkpoint=0.01, other=0.29)
    j.record("run_finished", step=200, loss=loss, eval_loss=0.9666, family="sim_cuda", recoveries=0)
    return run_dir


def _aborted_run(run_dir: Path) -> Path:
    """sim_cuda only: a lost worker is replaced, then collectives keep failing and the policy aborts."""
    j = Journal(run_dir / "journal.jsonl")
    j.record("run_started", run_dir=str(run_dir), family="sim_cuda", world_size=2, name="synthetic_abort")
    j.record("group_started", family="sim_cuda", world_size=2, step=0)
    loss = _heartbeats(j, "sim_cuda", 1, 50, 1.1)
    j.record(
        "failure", kind="worker_lost", family="sim_cuda", ranks=[1], step=50, detail="rank 1: actor died"
    )
    j.record("decision", action="replace", reason="replace rank 1 from the spares", family=None, step=50)
    j.record(
        "recovered",
        family="sim_cuda",
        step=50,
        kept_steps=None,
        action="replace",
        replaced_ranks=[1],
        state_from="peer snapshot from rank 0",
        recover_s=2.5,
        incarnation=1,
    )
    j.record("group_started", family="sim_cuda", world_size=2, step=50)
    _heartbeats(j, "sim_cuda", 51, 100, loss)
    j.record(
        "failure", kind="collective_failed", family="sim_cuda", ranks=[], step=100, detail="gloo timeout"
    )
    j.record("decision", action="abort", reason=ABORT_REASON, ranks=[], family=None, step=100)
    j.record("run_aborted", step=100, reason=ABORT_REASON)
    _goodput(j, 0.5, startup=3.0, recovery=2.5, lost_work=1.0, other=3.5)
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _pixels_of(path: Path, colour: str) -> int:
    """How many pixels of the image at ``path`` are within a few levels of ``colour``."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(colour))).max(axis=-1) < 0.04).sum())


def _assert_plot(path: Path, drawn: list[str], absent: tuple[str, ...] = ()) -> None:
    width, height = _png_size(path)
    assert width > 0 and height > 0
    colours = family_colours([*drawn, *absent])
    assert len({colours[f] for f in drawn}) == len(drawn), "each family needs its own colour"
    for family in drawn:
        assert _pixels_of(path, colours[family]) > 300, f"{family}'s segment is not drawn in its colour"
    for family in absent:
        assert _pixels_of(path, colours[family]) == 0, f"{family} never trained but is drawn"


def test_handover_story_names_families_decision_handover_parity_and_goodput(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _handover_run(tmp_path / "r2")
    assert main([str(run_dir)]) == ExitCode.FINISHED
    out = capsys.readouterr().out

    assert "run synthetic_r2" in out and "finished at step 200 on sim_cuda" in out
    assert "sim_npu    steps 1-100" in out and "sim_cuda   steps 101-200" in out
    assert "step 100: degraded_probe on sim_npu -> fallback:" in out
    assert LONG_DETAIL not in out, "a failure's detail is shortened"
    assert "fault_tolerance.max_degraded_probes=2" in out and "hand the run over to sim_cuda" in out
    assert "sim_npu -> sim_cuda at step 100" in out and "5.3 s from decision to first step" in out
    assert "parity passed" in out
    assert "goodput: 60.0% of 20.0 s" in out and "handover 5.2 s" in out and "checkpoint" not in out
    assert "final: step 200" in out and "held-out loss 0.9666" in out
    assert f"plot: {run_dir / 'loss.png'}" in out
    _assert_plot(run_dir / "loss.png", ["sim_npu", "sim_cuda"])


def test_json_report_carries_segments_handovers_and_the_png_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _handover_run(tmp_path / "r2")
    png = tmp_path / "plots" / "r2.png"
    assert main([str(run_dir), "--json", "--png", str(png)]) == ExitCode.FINISHED
    report = json.loads(capsys.readouterr().out)

    assert report["png"] == str(png) and png.is_file() and not (run_dir / "loss.png").exists()
    assert [(s["family"], s["first_step"], s["last_step"]) for s in report["segments"]] == [
        ("sim_npu", 1, 100),
        ("sim_cuda", 101, 200),
    ]
    [handover] = report["handovers"]
    assert handover["completed"] and handover["parity"]["passed"] and handover["step"] == 100
    assert [d["action"] for d in report["decisions"]] == ["continue", "fallback"]
    assert report["goodput"]["ratio"] == pytest.approx(0.6)


def test_aborted_story_names_the_reason_and_the_recovery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _aborted_run(tmp_path / "aborted")
    assert main([str(run_dir)]) == ExitCode.FINISHED  # the report ran; the run's own outcome is in it
    out = capsys.readouterr().out

    assert "run synthetic_abort" in out and "aborted after step 100 on sim_cuda" in out
    assert f"aborted: {ABORT_REASON}" in out
    assert "step 50 on sim_cuda: replace from peer snapshot from rank 0, replaced ranks [1] in 2.5 s" in out
    assert "step 100: abort: " + ABORT_REASON[:40] in out
    assert "hand-overs (0): none" in out and "final:" not in out
    assert "goodput: 50.0%" in out and "recovery 2.5 s" in out
    _assert_plot(run_dir / "loss.png", ["sim_cuda"], absent=("sim_npu",))


def _report(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.report", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("empty", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_journal_exits_2_naming_the_file(tmp_path: Path, empty: bool) -> None:
    if empty:
        (tmp_path / "journal.jsonl").write_text("")
    result = _report(tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(tmp_path / "journal.jsonl") in result.stderr
    assert ("is empty" if empty else "no journal at") in result.stderr
    assert not (tmp_path / "loss.png").exists()


def test_report_of_a_real_handover_run(r2_handover_run: tuple[Config, Path]) -> None:
    _, run_dir = r2_handover_run
    result = _report(run_dir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run r2_handover" in out and "finished at step 300 on sim_cuda" in out
    assert "  sim_npu    steps 1-" in out and "  sim_cuda   steps " in out
    assert "degraded_probe on sim_npu" in out and "fallback -> sim_cuda" in out
    assert "sim_npu -> sim_cuda at step" in out and "parity passed" in out
    assert "goodput: " in out and "handover " in out and "final: step 300" in out
    _assert_plot(run_dir / "loss.png", ["sim_npu", "sim_cuda"])
