"""Backend timeouts from the collective timeout: the values per backend, and what a joining process sees.

The values are pure functions (:mod:`trainer.devices.timeouts`). What a process sees is checked in fresh
interpreters that join a group through :func:`~trainer.devices.join.join_group`: on ``cpu`` (gloo) and on
``npu`` with the stand-in torch_npu (its hccl is gloo underneath, so the group forms here). NCCL and HCCL
themselves are not run: their reaction to these values is untested on hardware.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer.devices import get_adapter
from trainer.devices.timeouts import HCCL_EXEC_MAX_S, HCCL_GRANULE_S, apply, gloo, hccl, nccl

REPO_ROOT = Path(__file__).resolve().parents[2]
STAND_IN_ROOT = Path(__file__).resolve().parent / "npu_stand_in"
TIMEOUTS = st.floats(min_value=0.01, max_value=100_000, allow_nan=False, allow_infinity=False)


@given(TIMEOUTS)
def test_hccl_exec_timeout_is_whole_granules_and_below_the_process_group_timeout(t: float) -> None:
    timeouts = hccl(t)
    execute = int(timeouts.environment["HCCL_EXEC_TIMEOUT"])
    assert execute % HCCL_GRANULE_S == 0 and HCCL_GRANULE_S <= execute <= HCCL_EXEC_MAX_S
    # HCCL never gives up before the toolkit's own timeout would (up to its documented maximum) ...
    assert execute >= min(t, HCCL_EXEC_MAX_S)
    assert execute - HCCL_GRANULE_S < max(t, HCCL_GRANULE_S)  # ... and by less than one granule
    # ... and torch_npu's watchdog (the process group's timeout) outlasts it, as Ascend's guidance asks.
    assert timeouts.process_group_s > execute
    assert timeouts.process_group_s >= t
    assert 120 <= int(timeouts.environment["HCCL_CONNECT_TIMEOUT"]) <= 7200
    assert timeouts.environment["TORCH_HCCL_ASYNC_ERROR_HANDLING"] == "2"


@pytest.mark.parametrize(
    ("t", "execute", "process_group", "connect"),
    [(3.0, 68, 136.0, 120), (68.0, 68, 136.0, 120), (68.5, 136, 204.0, 120), (600.0, 612, 680.0, 600)],
)
def test_hccl_worked_examples(t: float, execute: int, process_group: float, connect: int) -> None:
    timeouts = hccl(t)
    assert timeouts.environment["HCCL_EXEC_TIMEOUT"] == str(execute)
    assert timeouts.process_group_s == process_group
    assert timeouts.environment["HCCL_CONNECT_TIMEOUT"] == str(connect)


@given(TIMEOUTS)
def test_nccl_and_gloo_keep_the_timeout_and_nccl_keeps_survivors_alive(t: float) -> None:
    assert gloo(t).process_group_s == t and gloo(t).environment == {}
    timeouts = nccl(t)
    assert timeouts.process_group_s == t
    # CleanUpOnly: the communicator is aborted, the process lives (torch's default, 3, kills it).
    assert timeouts.environment["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert int(timeouts.environment["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) >= 2 * t


@pytest.mark.parametrize("bad", [0, -5.0, float("nan"), float("inf"), "60"])
@pytest.mark.parametrize("derive", [gloo, nccl, hccl])
def test_a_timeout_that_is_not_positive_seconds_is_refused(derive: Any, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"timeout_s=.*allowed: a finite number of seconds > 0"):
        derive(bad)


def test_apply_overrides_what_the_environment_had() -> None:
    environ = {"HCCL_EXEC_TIMEOUT": "1836", "PATH": "/bin"}
    applied = apply(hccl(45.0), environ)
    assert environ == {"PATH": "/bin", **applied}
    assert applied["HCCL_EXEC_TIMEOUT"] == "68"


def test_each_family_derives_for_its_own_backend() -> None:
    assert {f: get_adapter(f).backend_timeouts(45.0).backend for f in ("cpu", "sim_npu", "cuda", "npu")} == {
        "cpu": "gloo",
        "sim_npu": "gloo",
        "cuda": "nccl",
        "npu": "hccl",
    }


# --- what a joining process sees ---------------------------------------------------------------------------
JOIN = """
import json, os, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from trainer.devices import get_adapter
from trainer.devices.join import join_group

family, timeout_s = sys.argv[1], float(sys.argv[2])
store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
applied = join_group(get_adapter(family), timeout_s, store=store, rank=0, world_size=1)
backend = dist.group.WORLD._get_backend(torch.device("cpu"))
names = ("HCCL_EXEC_TIMEOUT", "HCCL_CONNECT_TIMEOUT", "TORCH_HCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
print(json.dumps({
    "backend": dist.get_backend(),
    "group_timeout_s": backend.options._timeout.total_seconds(),
    "environ": {name: os.environ.get(name) for name in names},
    "applied": applied.to_dict(),
}))
dist.destroy_process_group()
"""


def _join(family: str, timeout_s: float, pythonpath: list[Path]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HCCL_", "TORCH_HCCL_", "TORCH_NCCL_"))}
    env["HCCL_EXEC_TIMEOUT"] = "1836"  # a stale value, as a cluster's profile may leave: it must be replaced
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*pythonpath, REPO_ROOT])
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    code = "import torch_npu\n" + JOIN if family == "npu" else JOIN
    proc = subprocess.run(
        [sys.executable, "-c", code, family, str(timeout_s)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_npu_process_joins_with_the_hccl_environment_and_a_longer_group_timeout() -> None:
    seen = _join("npu", 45.0, [STAND_IN_ROOT])
    assert seen["backend"] == "hccl"
    assert seen["environ"] == {
        "HCCL_EXEC_TIMEOUT": "68",
        "HCCL_CONNECT_TIMEOUT": "120",
        "TORCH_HCCL_ASYNC_ERROR_HANDLING": "2",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": None,
    }
    assert seen["group_timeout_s"] == 136.0 == seen["applied"]["process_group_s"]


def test_a_cpu_process_joins_with_the_timeout_as_asked_and_no_backend_environment() -> None:
    seen = _join("cpu", 45.0, [])
    assert seen["backend"] == "gloo"
    assert seen["group_timeout_s"] == 45.0
    assert seen["environ"]["HCCL_EXEC_TIMEOUT"] == "1836", "gloo's process must be left alone"
    assert seen["applied"]["environment"] == {}
