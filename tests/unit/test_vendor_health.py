"""The vendors' health tools as findings, read from STAND-IN executables that print the tools' documented
output (see :mod:`trainer.devices.vendor` for where each format is documented).

The stand-ins (:mod:`trainer.testing.vendor_stand_ins`) are small scripts written into ``tmp_path``:
``nvidia-smi`` reports an uncorrectable ECC error on GPU 1 (and a hardware slowdown, an inactive NVLink and an
Xid 79 there), ``npu-smi`` an alarm on NPU 2, ``hccn_tool`` a link down on NPU 0. They run as real processes,
under the readers' deadlines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.devices import get_adapter
from trainer.devices.sim import SIM_VISIBLE_DEVICES_ENV
from trainer.devices.vendor import (
    ascend_health,
    cuda_health,
    parse_hccn,
    parse_npu_smi_info,
    parse_nvidia_query,
    parse_nvlink_status,
    parse_xids,
    physical_device,
)
from trainer.policy import Action, FailureEvent, FailureKind, PolicyConfig, decide
from trainer.testing.vendor_stand_ins import (
    DMESG,
    NPU_SMI,
    NVIDIA_QUERY,
    NVLINK,
    write_stand_ins,
    write_tool,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    return write_stand_ins(tmp_path / "tools")


# --- parsers -----------------------------------------------------------------------------------------------
def test_the_documented_formats_parse() -> None:
    rows = parse_nvidia_query(NVIDIA_QUERY)
    assert (
        rows[1]["ecc.errors.uncorrected.volatile.total"] == "2"
        and rows[0]["pci.bus_id"] == "00000000:18:00.0"
    )
    assert parse_nvlink_status(NVLINK) == {0: True, 1: False}
    assert parse_xids(DMESG) == [("0000:3b:00", 79, "pid=2231, name=python, GPU has fallen off the bus.")]
    assert parse_npu_smi_info(NPU_SMI) == {0: "OK", 1: "OK", 2: "Alarm"}
    assert parse_hccn("link status: DOWN\n", "link status") == "DOWN"
    assert parse_hccn("net health status: Receive timeout\n", "net health status") == "Receive timeout"
    with pytest.raises(ValueError, match="expected 5 fields"):
        parse_nvidia_query("0, 00000000:18:00.0\n")
    with pytest.raises(ValueError, match="no 'link status'"):
        parse_hccn("command not supported\n", "link status")


# --- readers on stand-in tools -----------------------------------------------------------------------------
def test_an_uncorrectable_ecc_error_on_gpu_1_is_fatal_for_gpu_1_only(tools: Path) -> None:
    sick = cuda_health(1, timeout_s=20, directory=str(tools))
    details = {(f.tool, f.severity, f.detail) for f in sick.findings}
    assert ("nvidia-smi", "fatal", "2 uncorrectable ECC errors") in details
    assert ("nvidia-smi", "warning", "hardware slowdown active") in details
    assert ("nvidia-smi nvlink", "fatal", "NVLink links [1] inactive") in details
    assert ("kernel log", "fatal", "Xid 79: pid=2231, name=python, GPU has fallen off the bus.") in details
    assert {f.device for f in sick.findings} == {1}
    assert sick.ran == ("nvidia-smi", "nvidia-smi nvlink", "kernel log") and sick.skipped == {}
    well = cuda_health(0, timeout_s=20, directory=str(tools))
    assert well.findings == () and well.fatal == ()
    # Addressed as a worker sees it: CUDA_VISIBLE_DEVICES (set by Ray) maps its device 0 to the host's GPU.
    by_uuid = cuda_health(physical_device(0, "GPU-5f3c0b1e-0000-0000-0000-000000000001"), 20, str(tools))
    assert [f.detail for f in by_uuid.fatal][:1] == ["2 uncorrectable ECC errors"]
    assert physical_device(0, "3,1") == 3 and physical_device(1, None) == 1
    missing = cuda_health(7, timeout_s=20, directory=str(tools))
    assert missing.findings == () and missing.skipped["nvidia-smi"] == "nvidia-smi lists no GPU 7"


def test_a_link_down_on_npu_0_is_fatal_for_npu_0_only(tools: Path) -> None:
    down = ascend_health(0, timeout_s=20, directory=str(tools))
    assert [(f.device, f.tool, f.severity, f.detail) for f in down.findings] == [
        (0, "hccn_tool link", "fatal", "link DOWN")
    ]
    assert ascend_health(1, timeout_s=20, directory=str(tools)).findings == ()
    alarm = ascend_health(2, timeout_s=20, directory=str(tools))
    assert [(f.tool, f.detail) for f in alarm.fatal] == [("npu-smi", "health Alarm")]


def test_absent_or_hung_tools_are_skipped_with_the_reason(tmp_path: Path, tools: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    none = ascend_health(0, timeout_s=5, directory=str(empty))
    assert none.findings == () and none.ran == ()
    assert none.skipped["hccn_tool link"] == f"hccn_tool not found on {empty}"
    write_tool(tools, "dmesg", [("", DMESG)], hang=True)
    hung = cuda_health(1, timeout_s=1.5, directory=str(tools))
    assert hung.skipped["kernel log"] == "dmesg did not answer within 1.5 s"
    assert hung.fatal[0].detail == "2 uncorrectable ECC errors"


def test_families_without_tools_say_why() -> None:
    cpu = get_adapter("cpu").vendor_health(torch.device("cpu"), 5)
    assert cpu.skipped == {"vendor tools": "the cpu family has none"}
    sim = get_adapter("sim_npu").vendor_health(torch.device("cpu"), 5)
    assert "probes.vendor_tools_dir" in sim.skipped["vendor tools"]


def test_a_simulated_family_reads_stand_ins_for_its_visible_device(
    tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = get_adapter("sim_cuda")
    device = adapter.bind(1)
    assert adapter.vendor_health(device, 20, str(tools)).fatal[0].detail == "2 uncorrectable ECC errors"
    npu = get_adapter("sim_npu")
    assert npu.vendor_health(npu.bind(0), 20, str(tools)).fatal[0].detail == "link DOWN"
    # In a worker group, the bundle's device is made visible, as Ray does with CUDA_VISIBLE_DEVICES.
    monkeypatch.setenv(SIM_VISIBLE_DEVICES_ENV, "1")
    assert adapter.vendor_health(adapter.bind(0), 20, str(tools)).fatal[0].device == 1


def test_the_policy_excludes_an_unhealthy_device() -> None:
    detail = "rank 1: nvidia-smi: 2 uncorrectable ECC errors"
    event = FailureEvent(
        FailureKind.DEVICE_UNHEALTHY, (1,), step=0, family="sim_cuda", time=0.0, detail=detail
    )
    decision = decide([event], PolicyConfig(max_restarts=3))
    assert decision.action is Action.EXCLUDE and decision.ranks == (1,)
    assert "device_unhealthy on ranks [1]" in decision.reason


# --- the probe command, end to end -------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "sick_rank", "detail"), [("sim_cuda", 1, "uncorrectable ECC")])
def test_the_probe_command_names_the_device_the_tools_report(
    tools: Path, family: str, sick_rank: int, detail: str
) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "trainer.probe", "--device", family, "--world-size", "2", "--sizes", "4K"]
    cmd += ["--vendor-tools-dir", str(tools)]
    proc = subprocess.run(
        [*cmd, "--iters", "1", "--json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["unhealthy_device_ranks"] == [sick_rank] and summary["healthy"] is False
    sick = summary["devices"][str(sick_rank)]
    assert sick["device_unhealthy"] is True and any(detail in f["detail"] for f in sick["vendor"]["findings"])
    assert summary["wrong_compute_ranks"] == [] and summary["failed_device_ranks"] == []


def test_a_tools_directory_that_does_not_exist_is_refused_naming_the_key(tmp_path: Path) -> None:
    from trainer.config.operations import ProbesConfig
    from trainer.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"probes.vendor_tools_dir='.*nowhere' is not allowed; allowed: null or"
    ):
        ProbesConfig(vendor_tools_dir=str(tmp_path / "nowhere"))
    assert ProbesConfig(vendor_tools_dir=str(tmp_path)).vendor_tools_dir == str(tmp_path)
