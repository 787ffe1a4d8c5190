"""The NPU adapter and its stand-in torch_npu against the REAL torch-npu wheel for the pinned torch.

The wheel is downloaded once (``pip download --no-deps``) into a cache that outlives the test run
(``$XDG_CACHE_HOME/fleet-trainer/wheels``, else ``~/.cache/...``) and read as a zip: never installed, never
imported — installed without CANN it breaks ``import torch``. Names are resolved over its Python sources
(:mod:`trainer.testing.wheel_api`): every ``torch.npu`` call of the adapter exists with a signature that takes
the adapter's arguments, every function of the stand-in has the real one's parameters, and the registrations
the adapter relies on (the ``npu`` device type, ``torch.npu``, the ``hccl`` backend, the visible-devices
variable) are made by the wheel. What lives only in ``torch_npu._C`` (C++) cannot be read here and is
listed as unchecked. Skipped, saying so, only when the wheel cannot be downloaded for want of a network.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.devices.npu import NpuAdapter
from trainer.testing.wheel_api import Resolution, WheelSources, accepts, dotted_name, function_params

REPO_ROOT = Path(__file__).resolve().parents[2]
#: torch-npu's release for the pinned torch (torch-npu numbers its releases after torch's).
TORCH_NPU_VERSION = "2.13.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fleet-trainer" / "wheels"
ADAPTER_SOURCES = [REPO_ROOT / "trainer/devices/accelerator.py", REPO_ROOT / "trainer/devices/npu.py"]
STAND_IN = REPO_ROOT / "tests/unit/npu_stand_in/torch_npu/__init__.py"
#: What pip prints when it cannot reach the index: the one reason to skip rather than fail.
NETWORK_ERRORS = (
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Max retries exceeded",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "No route to host",
    "Connection refused",
    "ProxyError",
)


def _download(cache: Path) -> Path:
    """The cached wheel for this Python and platform, downloaded first if missing."""
    pattern = f"torch_npu-{TORCH_NPU_VERSION}-cp{sys.version_info.major}{sys.version_info.minor}-*.whl"
    cached = sorted(cache.glob(pattern))
    if cached:
        return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    # Into a private directory first, then renamed: a concurrent run never sees a partial wheel.
    with tempfile.TemporaryDirectory(dir=cache) as partial:
        cmd = [sys.executable, "-m", "pip", "download", f"torch-npu=={TORCH_NPU_VERSION}", "--no-deps"]
        cmd += ["--only-binary=:all:", "--retries", "1", "--timeout", "20", "--disable-pip-version-check"]
        proc = subprocess.run([*cmd, "-d", partial], capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            unreachable = [line for line in output.splitlines() if any(m in line for m in NETWORK_ERRORS)]
            if unreachable:
                reason = unreachable[-1].strip()[:300]
                pytest.skip(f"torch-npu=={TORCH_NPU_VERSION} could not be downloaded (no network): {reason}")
            pytest.fail(f"pip download torch-npu=={TORCH_NPU_VERSION} failed:\n{output[-3000:]}")
        [wheel] = Path(partial).glob(pattern)
        os.replace(wheel, cache / wheel.name)
    return cache / wheel.name


@pytest.fixture(scope="module")
def wheel() -> WheelSources:
    return WheelSources(_download(CACHE), compiled_modules=("torch_npu._C",))


def _real(wheel: WheelSources, dotted: str) -> Resolution:
    resolution = wheel.resolve(dotted)
    assert resolution.kind != "missing", f"{dotted} does not exist in {wheel.wheel.name}"
    return resolution


# --- what the adapter and the stand-in use, read from their sources ---------------------------------------
def _device_module_calls() -> list[dict[str, Any]]:
    """Calls the adapter makes on the family's device module: ``module.x(...)`` or ``self._module().x(...)``."""
    uses = []
    for path in ADAPTER_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            on_module = (isinstance(owner, ast.Name) and owner.id == "module") or (
                isinstance(owner, ast.Call) and dotted_name(owner.func) == "self._module"
            )
            if on_module:
                uses.append(
                    {
                        "name": node.func.attr,
                        "positional": len(node.args),
                        "keywords": tuple(k.arg for k in node.keywords if k.arg is not None),
                        "where": f"{path.relative_to(REPO_ROOT)}:{node.lineno}",
                    }
                )
    return uses


def _result_attributes() -> set[tuple[str, str]]:
    """``module.f(...).attr`` in the adapter: attributes of what a device-module call returns."""
    found = set()
    for path in ADAPTER_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call):
                callee = dotted_name(node.value.func)
                if callee is not None and callee.startswith("module."):
                    found.add((callee.split(".", 1)[1], node.attr))
    return found


def _torch_npu_attributes() -> set[str]:
    """``torch_npu.x`` and ``getattr(torch_npu, "x", ...)`` in the adapter."""
    found = set()
    for path in ADAPTER_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and dotted_name(node.value) == "torch_npu":
                found.add(node.attr)
            if isinstance(node, ast.Call) and dotted_name(node.func) == "getattr" and len(node.args) >= 2:
                target, name = node.args[0], node.args[1]
                if dotted_name(target) == "torch_npu" and isinstance(name, ast.Constant):
                    found.add(str(name.value))
    return found


def _stand_in() -> tuple[ast.Module, dict[str, ast.FunctionDef]]:
    tree = ast.parse(STAND_IN.read_text())
    return tree, {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _stand_in_api(tree: ast.Module) -> tuple[str, ...]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NPU_API" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{STAND_IN} defines no NPU_API")


def _stand_in_calls(tree: ast.Module, suffix: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and (dotted_name(n.func) or "").split(".")[-1] == suffix
    ]


# --- tests -------------------------------------------------------------------------------------------------
def test_the_wheel_is_the_release_for_the_pinned_torch(wheel: WheelSources) -> None:
    pinned = torch.__version__.split("+")[0]
    assert pinned == TORCH_NPU_VERSION, f"torch is pinned at {pinned}: set TORCH_NPU_VERSION to its torch-npu"
    version = _real(wheel, "torch_npu.version.__version__")
    source = wheel.tree(version.where.rsplit(":", 1)[0])
    assert f"__version__ = '{TORCH_NPU_VERSION}'" in ast.unparse(source)
    assert _real(wheel, "torch_npu.__version__").kind == "value"


def test_every_device_module_call_of_the_adapter_exists_with_its_call_shape(
    wheel: WheelSources, capsys: pytest.CaptureFixture[str]
) -> None:
    uses = _device_module_calls()
    assert {u["name"] for u in uses} >= {"set_device", "device_count", "get_rng_state", "synchronize"}
    unchecked = []
    for use in uses:
        real = _real(wheel, f"torch_npu.npu.{use['name']}")
        if real.kind == "compiled":
            unchecked.append(f"torch.npu.{use['name']} (bound to torch_npu._C, {real.where})")
            continue
        assert real.kind == "function" and real.params is not None, (use, real)
        mismatch = accepts(real.params, use["positional"], use["keywords"])
        assert mismatch is None, f"{use['where']}: torch.npu.{use['name']}: {mismatch} ({real.where})"
        unchecked += [f"{name} (called by torch.npu.{use['name']})" for name in wheel.compiled_names(real)]
    for function, attribute in sorted(_result_attributes()):
        unchecked.append(f"torch.npu.{function}(...).{attribute} (an object made by torch_npu._C)")
    with capsys.disabled():
        print(f"\nchecked against {wheel.wheel.name}; unchecked, implemented in torch_npu._C only:")
        for line in sorted(set(unchecked)):
            print(f"  {line}")


def test_the_wheel_makes_the_registrations_the_adapter_relies_on(wheel: WheelSources) -> None:
    adapter = NpuAdapter()  # constructing it imports nothing
    [rename] = wheel.calls("torch.utils.rename_privateuse1_backend")
    assert rename.constant_args == (adapter.torch_device_type(),)
    [device_module] = wheel.calls("torch._register_device_module")
    assert device_module.constant_args == (adapter.torch_device_type(), "torch_npu.npu")
    assert _real(wheel, "torch_npu.npu").kind == "module"
    backends = [c for c in wheel.calls("Backend.register_backend") if c.constant_args[:1] == ("hccl",)]
    assert len(backends) == 1 and adapter.distributed_backend() == "hccl", backends
    variable = adapter.visible_devices_env()
    assert variable is not None and wheel.string_constants(variable), f"{variable} is never read by the wheel"
    for name in _torch_npu_attributes():
        _real(wheel, f"torch_npu.{name}")


def test_the_stand_in_has_the_real_parameters_and_registrations(wheel: WheelSources) -> None:
    tree, functions = _stand_in()
    api = _stand_in_api(tree)
    assert {u["name"] for u in _device_module_calls()} <= set(api), (
        "the stand-in lacks a call the adapter makes"
    )
    docstring = ast.get_docstring(tree) or ""
    assert wheel.wheel.name in docstring, f"the stand-in's docstring must name the wheel: {wheel.wheel.name}"
    for name in api:
        real = _real(wheel, f"torch_npu.npu.{name}")
        assert real.kind == "function", (name, real)
        own = function_params(functions[name])
        assert own == real.params, f"stand-in {name}{own} != {real.where} {real.params}"
    [rename] = _stand_in_calls(tree, "rename_privateuse1_backend")
    [real_rename] = wheel.calls("torch.utils.rename_privateuse1_backend")
    assert tuple(ast.literal_eval(a) for a in rename.args) == real_rename.constant_args
    [module] = _stand_in_calls(tree, "_register_device_module")
    assert ast.literal_eval(module.args[0]) == "npu"
    [backend] = _stand_in_calls(tree, "register_backend")
    [real_backend] = [c for c in wheel.calls("Backend.register_backend") if c.constant_args[:1] == ("hccl",)]
    keywords = {k.arg: ast.literal_eval(k.value) for k in backend.keywords if k.arg is not None}
    assert keywords.keys() == real_backend.keywords.keys()
    assert keywords["extended_api"] == real_backend.keywords["extended_api"] is True
    # Deliberate difference, stated in the stand-in's docstring: its hccl also serves CPU tensors.
    assert set(keywords["devices"]) >= set(real_backend.keywords["devices"])
    creator = functions[dotted_name(backend.args[1]) or ""]
    assert len(creator.args.args) == 2, "an extended_api creator takes (dist_backend_opts, pg_options)"


def test_a_name_the_wheel_lacks_is_reported_missing(wheel: WheelSources) -> None:
    # The check can fail: a name that is not there, and a call shape that does not fit.
    assert wheel.resolve("torch_npu.npu.no_such_function").kind == "missing"
    set_device = _real(wheel, "torch_npu.npu.set_device")
    assert set_device.params is not None
    assert accepts(set_device.params, 2, ()) == "2 positional arguments, at most 1 taken"
    assert accepts(set_device.params, 0, ("index",)) == "no parameter named 'index'"
    assert accepts(set_device.params, 0, ()) == "required parameters not given: ['device']"


def test_the_cached_wheel_is_used_without_a_download(wheel: WheelSources, tmp_path: Path) -> None:
    shutil.copy(wheel.wheel, tmp_path / wheel.wheel.name)
    # A cache hit returns the cached file; pip is not run.
    assert _download(tmp_path) == tmp_path / wheel.wheel.name
