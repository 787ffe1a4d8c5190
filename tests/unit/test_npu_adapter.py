"""Wiring of the NPU adapter against torch_npu's API surface, using a STAND-IN torch_npu.

What this checks: that :class:`~trainer.devices.npu.NpuAdapter` reaches an Ascend runtime the way torch_npu
exposes it — importing ``torch_npu`` lazily, the ``npu`` device type and ``torch.npu`` device module, the
``hccl`` process-group backend, ``ASCEND_RT_VISIBLE_DEVICES`` and the ``NPU`` Ray resource — and that every
way importing torch_npu can fail (absent; CANN libraries missing, raising RuntimeError or OSError) turns
into "unavailable, because …" instead of an exception.

What this does NOT check: Ascend hardware, CANN or HCCL. The stand-in ``torch_npu`` package
(``tests/unit/npu_stand_in/torch_npu``; test_npu_wheel_api.py checks it against the real wheel) is
CPU-backed: its device module answers from Python counters and a CPU generator, and its ``hccl`` backend is
gloo underneath. Each case runs in a fresh interpreter
(``subprocess.run``), because importing it renames torch's PrivateUse1 backend and registers a device
module and a backend, none of which can be undone in the test process. Each child prints one JSON line that
the test parses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
#: The stand-in torch_npu package (its docstring says which real wheel it was checked against).
STAND_IN_ROOT = Path(__file__).resolve().parent / "npu_stand_in"
STAND_IN_DEVICES = 2
STAND_IN_VERSION = "0.0.0+standin"

# Each child prints exactly one JSON object as its last stdout line.
WIRING = """
import json, sys
import torch
import trainer.devices
from trainer.devices import get_adapter

report = {"imported_with_package": "torch_npu" in sys.modules, "torch_npu_before_probe": hasattr(torch, "npu")}
adapter = get_adapter("npu")
report["imported_by_get_adapter"] = "torch_npu" in sys.modules
report["available"] = adapter.is_available()
report["reason"] = adapter.unavailable_reason()
report["device_count"] = adapter.device_count()
device = adapter.bind(1)
report["bind"] = [device.type, device.index]
report["current_device"] = torch.npu.current_device()
report["backend"] = adapter.distributed_backend()
report["backend_registered"] = adapter.distributed_backend() in torch.distributed.Backend.backend_list
report["visible_env"] = adapter.visible_devices_env()
report["ray_resource"] = adapter.ray_resource()
report["memory"] = adapter.memory_stats(device)
report["describe"] = adapter.describe()
state = adapter.get_rng_state(device)
report["rng_keys"] = sorted(state)
report["rng_dtypes"] = sorted({str(t.dtype) for t in state.values()})
import torch_npu
first = (torch.rand(4), torch.rand(4, generator=torch_npu.generator))
adapter.set_rng_state(state, device)
again = (torch.rand(4), torch.rand(4, generator=torch_npu.generator))
report["rng_restored"] = [torch.equal(a, b) for a, b in zip(first, again)]
adapter.seed(7, device)
seeded = torch.rand(4, generator=torch_npu.generator)
torch_npu.generator.manual_seed(7)
report["seed_reaches_device"] = torch.equal(seeded, torch.rand(4, generator=torch_npu.generator))
print(json.dumps(report))
"""

COLLECTIVE = """
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from trainer.devices import get_adapter

port, rank, world_size = (int(arg) for arg in sys.argv[1:4])
adapter = get_adapter("npu")
assert adapter.is_available(), adapter.unavailable_reason()
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
dist.init_process_group(
    backend=adapter.distributed_backend(), store=store, rank=rank, world_size=world_size,
    timeout=timedelta(seconds=60),
)
tensor = torch.tensor([float(rank + 1)])
dist.all_reduce(tensor)
report = {"backend": dist.get_backend(), "sum": tensor.item(), "world_size": dist.get_world_size()}
# No dist.barrier(): it asks torch._C._get_accelerator(), which needs the C++ PrivateUse1 hooks that only
# the real torch_npu registers.
dist.destroy_process_group()
print(json.dumps(report))
"""

UNAVAILABLE = """
import importlib.abc, json, sys
report = {}
try:
    if "--block" in sys.argv:
        class _NoTorchNpu(importlib.abc.MetaPathFinder):
            # Behaves as if torch_npu were not installed, even where a real one is.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch_npu":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None
        sys.meta_path.insert(0, _NoTorchNpu())
    import trainer.devices
    from trainer.devices import get_adapter
    from trainer.errors import DeviceUnavailableError
    report["imported_with_package"] = "torch_npu" in sys.modules
    adapter = get_adapter("npu")
    report["available"] = adapter.is_available()
    report["reason"] = adapter.unavailable_reason()
    report["device_count"] = adapter.device_count()
    report["describe"] = adapter.describe()
    report["auto"] = get_adapter("auto").name
    try:
        adapter.bind(0)
    except DeviceUnavailableError as exc:
        report["bind_error"] = str(exc)
    report["torch_npu_loaded"] = "torch_npu" in sys.modules
except BaseException as exc:
    report["escaped"] = repr(exc)
print(json.dumps(report))
"""


def _env(pythonpath: list[Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*pythonpath, REPO_ROOT])
    # No third-party device backend may load itself on `import torch`; only the stand-in, imported explicitly.
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    env.pop("ASCEND_RT_VISIBLE_DEVICES", None)
    return env


def _parse(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert completed.returncode == 0, f"child failed ({completed.returncode}):\n{completed.stderr}"
    lines = completed.stdout.strip().splitlines()
    assert lines, f"child printed nothing; stderr:\n{completed.stderr}"
    return json.loads(lines[-1])


def _run_child(code: str, pythonpath: list[Path], *args: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=_env(pythonpath),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return _parse(completed)


def _write_package(root: Path, init_source: str) -> Path:
    package = root / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init_source)
    return root


@pytest.fixture
def stand_in() -> Path:
    """The directory holding the working stand-in ``torch_npu``; put it on PYTHONPATH."""
    return STAND_IN_ROOT


def test_adapter_wires_to_the_stand_in(stand_in: Path) -> None:
    report = _run_child(WIRING, [stand_in])
    assert report["imported_with_package"] is False, "importing trainer.devices imported torch_npu"
    assert report["torch_npu_before_probe"] is False
    assert report["imported_by_get_adapter"] is False, "constructing NpuAdapter imported torch_npu"
    assert report["available"] is True, report["reason"]
    assert report["reason"] is None
    assert report["device_count"] == STAND_IN_DEVICES
    assert report["bind"] == ["npu", 1]
    assert report["current_device"] == 1, "bind(1) did not call torch.npu.set_device(1)"
    assert report["backend"] == "hccl"
    assert report["backend_registered"] is True
    assert report["visible_env"] == "ASCEND_RT_VISIBLE_DEVICES"
    assert report["ray_resource"] == "NPU"
    assert report["memory"] == {"allocated": 2048, "reserved": 8192, "total": 64 * 2**30}
    describe = report["describe"]
    assert describe["family"] == "npu"
    assert describe["torch_npu"] == STAND_IN_VERSION
    assert describe["device_count"] == STAND_IN_DEVICES
    assert describe["device_name"] == "Ascend910B (stand-in)"
    assert report["rng_keys"] == ["cpu", "npu"]
    assert report["rng_dtypes"] == ["torch.uint8"]
    assert report["rng_restored"] == [True, True], "set_rng_state restored (host, device) only partly"
    assert report["seed_reaches_device"] is True, "seed() did not call torch.npu.manual_seed_all"


@pytest.mark.parametrize("world_size", [1, 2])
def test_hccl_backend_from_the_adapter_runs_a_collective(stand_in: Path, world_size: int) -> None:
    # The parent holds the rendezvous store on a kernel-chosen port, so no free-port race.
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", COLLECTIVE, str(store.port), str(rank), str(world_size)],
            env=_env([stand_in]),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    reports = []
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=TIMEOUT_S)
            reports.append(_parse(subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    expected_sum = world_size * (world_size + 1) / 2
    for report in reports:
        assert report == {"backend": "hccl", "sum": expected_sum, "world_size": world_size}


def _assert_unavailable(report: dict[str, Any], reason_contains: str) -> None:
    assert "escaped" not in report, f"an exception escaped the adapter: {report['escaped']}"
    assert report["imported_with_package"] is False
    assert report["available"] is False
    assert reason_contains in report["reason"]
    assert report["device_count"] == 0
    assert report["describe"]["family"] == "npu"
    assert reason_contains in report["describe"]["unavailable"]
    assert report["auto"] != "npu"
    assert reason_contains in report["bind_error"]
    assert report["torch_npu_loaded"] is False


def test_without_torch_npu_the_family_is_unavailable(tmp_path: Path) -> None:
    report = _run_child(UNAVAILABLE, [], "--block")
    _assert_unavailable(report, "torch_npu")
    assert report["reason"].startswith("ModuleNotFoundError")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("RuntimeError", "libhccl.so: cannot open shared object file (set up CANN: source set_env.sh)"),
        ("OSError", "libascendcl.so: cannot open shared object file: No such file or directory"),
    ],
)
def test_a_torch_npu_that_fails_to_import_makes_the_family_unavailable(
    tmp_path: Path, error: str, message: str
) -> None:
    broken = _write_package(
        tmp_path / "broken",
        f'"""STAND-IN for a torch_npu installed without CANN: importing it fails."""\n\nraise {error}({message!r})\n',
    )
    report = _run_child(UNAVAILABLE, [broken])
    _assert_unavailable(report, error)
    assert message in report["reason"]
