"""Vendor health tools that report a failing device get that device's worker excluded, on a real local Ray.

The tools are STAND-INS (trainer.testing.vendor_stand_ins: documented output formats) in a
directory named by ``probes.vendor_tools_dir``; simulated families read them for the device of their bundle,
as a CUDA worker's tools would read the GPU Ray made visible to it.
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
from trainer.testing.vendor_stand_ins import write_stand_ins

pytestmark = pytest.mark.usefixtures("local_ray")

SMALL = (
    "cluster=ray_local",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.seq_len=16",
    "train.global_batch_size=8",
    "train.steps=10",
    "checkpoint.interval_steps=10",
    "cluster.chunk_steps=5",
    "probes.preflight=true",
)


def _events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in Journal(run_dir / "journal.jsonl").read() if e["event"] == name]


@pytest.mark.parametrize(
    ("family", "device", "detail"),
    [("sim_cuda", 1, "2 uncorrectable ECC errors"), ("sim_npu", 0, "link DOWN")],
)
def test_a_device_its_vendor_tools_report_failing_is_excluded(
    make_config: Callable[..., Config], tmp_path: Path, family: str, device: int, detail: str
) -> None:
    tools = write_stand_ins(tmp_path / "tools")
    config = make_config(*SMALL, f"device={family}", f"probes.vendor_tools_dir={tools}")
    assert run(config, run_dir=tmp_path / "run") == ExitCode.FINISHED
    [first, *_] = _events(tmp_path / "run", "probe")
    assert first["phase"] == "preflight" and first["unhealthy_device_ranks"] == [device]
    assert [
        (f["rank"], f["severity"], f["detail"]) for f in first["vendor_findings"] if f["severity"] == "fatal"
    ][:1] == [(device, "fatal", detail)]
    [failure] = [e for e in _events(tmp_path / "run", "failure") if e["kind"] == "device_unhealthy"]
    assert failure["ranks"] == [device]
    decision = _events(tmp_path / "run", "decision")[0]
    assert decision["action"] == "exclude" and decision["ranks"] == [device]
    assert decision["step"] == 0  # before any training on the failing device
